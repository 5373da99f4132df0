import pytest

import mambamerge
from mambamerge.flops import FlopsReport, flops

# Vim-Ti by hand (D=192, d_inner=384, N=16, dt_rank=12, d_conv=4), MACs per token and block
TI_SHARED = 192 * 768 + 384 * 192                          # in_proj + out_proj
TI_DIRECTION = 384 * 4 + 384 * 44 + 12 * 384 + 9 * 384 * 16 + 2 * 384  # conv1d, x_proj, dt_proj, scan
TI_PATCH_EMBED = 196 * 192 * 3 * 16 * 16
TI_HEAD = 192 * 1000


def rmeeto(name, r):
    """R-MeeTo's layout: r tokens before blocks 2, 4, ..., 22."""
    return mambamerge.patch(mambamerge.create_model(name), "mame", schedule="constant", r=r, start=2, every=2)


@pytest.mark.parametrize("name, one, both", [("vim_tiny", 1.45, 1.82), ("vim_small", 5.08, 5.91),
                                             ("vim_base", 18.87, 20.89)])
def test_dense_matches_published(name, one, both):
    report = flops(mambamerge.create_model(name))
    assert report.one_direction / 1e9 == pytest.approx(one, rel=0.02)
    assert report.both_directions / 1e9 == pytest.approx(both, rel=0.02)
    assert report.merge_overhead == 0
    assert report.tokens == (197,) * 24


def test_dense_tiny_by_hand():
    report = flops(mambamerge.create_model("vim_tiny"))
    assert report.patch_embed == TI_PATCH_EMBED
    assert report.head == TI_HEAD
    assert report.blocks_one_direction == (197 * (TI_SHARED + TI_DIRECTION),) * 24
    assert report.one_direction == TI_PATCH_EMBED + 24 * 197 * (TI_SHARED + TI_DIRECTION) + TI_HEAD
    assert report.both_directions == TI_PATCH_EMBED + 24 * 197 * (TI_SHARED + 2 * TI_DIRECTION) + TI_HEAD


def test_rmeeto_schedule_removes_exactly_the_token_layers():
    dense = flops(mambamerge.create_model("vim_tiny"))
    report = flops(rmeeto("vim_tiny", 5))
    # 5 tokens before block b leave blocks b..23: 24 - b token-layers each, b = 2, 4, ..., 22
    removed = 5 * sum(24 - b for b in range(2, 23, 2))
    assert removed == 660
    assert report.one_direction == dense.one_direction - removed * (TI_SHARED + TI_DIRECTION)
    assert report.both_directions == dense.both_directions - removed * (TI_SHARED + 2 * TI_DIRECTION)
    assert report.tokens[:4] == (197, 197, 192, 192) and report.tokens[-1] == 197 - 55
    # mame (global matching) scores r sources against every token: r * L * D per step, L before the step
    lengths = [197 - 5 * k for k in range(11)]
    assert report.merge_overhead == sum(5 * length * 192 for length in lengths)
    assert report.total_one_direction == report.one_direction + report.merge_overhead
    assert report.total_both_directions == report.both_directions + report.merge_overhead


@pytest.mark.parametrize("name, r, published", [("vim_small", 11, 3.58), ("vim_base", 11, 13.21)])
def test_rmeeto_published_figures_loosely(name, r, published):
    """R-MeeTo's own pruned figures (their counter; ours is within 2% for S and B)."""
    assert flops(rmeeto(name, r)).one_direction / 1e9 == pytest.approx(published, rel=0.02)


def test_block_counts_scale_linearly_with_tokens():
    model = mambamerge.patch(mambamerge.create_model("vim_tiny"), "mame", schedule=[0, 97, 0, 50] + [0] * 20)
    report = flops(model)
    assert report.tokens[:5] == (197, 100, 100, 50, 50)
    for tokens, one, both in zip(report.tokens, report.blocks_one_direction, report.blocks_both_directions):
        assert one == tokens * (TI_SHARED + TI_DIRECTION)
        assert both == tokens * (TI_SHARED + 2 * TI_DIRECTION)
    assert report.blocks_one_direction[1] * 2 == report.blocks_one_direction[3] * 4


def test_unpatched_model_is_dense_again():
    model = rmeeto("vim_tiny", 5)
    mambamerge.unpatch(model)
    assert flops(model) == flops(mambamerge.create_model("vim_tiny"))


def test_other_input_size_uses_its_grid():
    model = mambamerge.create_model("vim_tiny")
    report = flops(model, 448)
    assert report.tokens == (28 * 28 + 1,) * 24
    assert report.patch_embed == 784 * 192 * 3 * 256
    assert report.one_direction == 784 * 192 * 3 * 256 + 24 * 785 * (TI_SHARED + TI_DIRECTION) + TI_HEAD
    assert flops(model, (448, 448)) == report
    assert flops(model, (224, 448)).tokens[0] == 14 * 28 + 1
    assert flops(model, 239).tokens[0] == 14 * 14 + 1  # (239 - 16) // 16 + 1 = 14
    assert flops(model, (224, 224)) == flops(model)


def test_timm_style_input_size_with_channels():
    model = mambamerge.create_model("vim_tiny")
    assert flops(model, (3, 448, 448)) == flops(model, (448, 448))
    assert flops(model, [3, 224, 224]) == flops(model)
    with pytest.raises(ValueError, match="has 1 channels but the model takes 3"):
        flops(model, (1, 224, 224))


def test_parameters_counted_by_hand():
    block = (192 + 192 * 768 + 384 * 192  # norm, in_proj, out_proj
             + 2 * (384 * 4 + 384 + 384 * 44 + 12 * 384 + 384 + 384 * 16 + 384))  # per direction
    expected = 3 * 256 * 192 + 192 + 192 + 197 * 192 + 24 * block + 192 + 192 * 1000 + 1000
    report = flops(mambamerge.create_model("vim_tiny"))
    assert report.params == expected
    assert report.summary()["params"] == expected
    assert round(expected / 1e6) == 7  # Vim-Ti's published size
    assert "7.15 M parameters" in str(report)


def test_strided_patches_follow_the_grid():
    report = flops(mambamerge.create_model("vim_tiny_plus"))
    assert report.tokens[0] == 27 * 27 + 1  # (224 - 16) // 8 + 1 = 27
    assert report.patch_embed == 729 * 192 * 3 * 256


def test_patched_model_at_another_size_keeps_its_removals():
    report = flops(rmeeto("vim_tiny", 5), 448)
    assert report.tokens[:4] == (785, 785, 780, 780) and report.tokens[-1] == 785 - 55


@pytest.mark.parametrize("size", [0, -224, 8, (224, 8), (0, 224), (224,), "224", 224.0, (224, True), True])
def test_bad_input_size(size):
    with pytest.raises(ValueError):
        flops(mambamerge.create_model("vim_tiny"), size)


def test_schedule_too_long_for_a_small_input():
    with pytest.raises(ValueError, match="schedule asks for 5 tokens before block 2, but only 3 of the 5 tokens"):
        flops(rmeeto("vim_tiny", 5), 32)


def test_headless_model_counts_no_head():
    assert flops(mambamerge.create_model("vim_tiny", num_classes=0)).head == 0


def test_summary_and_str():
    report = flops(rmeeto("vim_tiny", 5))
    assert isinstance(report, FlopsReport)
    s = report.summary()
    assert s["one_direction"] == pytest.approx(report.one_direction / 1e9)
    assert s["total_one_direction"] == pytest.approx(s["one_direction"] + s["merge_overhead"])
    assert s["tokens"] == list(report.tokens) and s["final_tokens"] == 142
    assert len(s["blocks_one_direction"]) == len(s["blocks_both_directions"]) == 24
    assert sum(s["blocks_one_direction"]) + s["patch_embed"] + s["head"] == pytest.approx(s["one_direction"])
    text = str(report)
    assert f"{s['one_direction']:.3f}" in text and "both directions" in text
