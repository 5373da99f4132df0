"""Merging on VideoMamba (class token at the head) and Audio Mamba (middle class token, three mixers):
the class token is never merged and stays where it is promised, order is kept where promised, a batch
equals its items one by one, and zero reduction changes nothing."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mambamerge
from mambamerge.flops import flops
from mambamerge.merge import METHODS
from conftest import perturb_

ORDER_PRESERVING = sorted(set(METHODS) - {"tome_unordered", "evit"})
DETERMINISTIC = sorted(set(METHODS) - {"random"})
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAMILIES = ["videomamba", "aum:Bi-Bi", "aum:Fo-Bi", "aum:Fo-Fo"]


def small(family, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    if family == "videomamba":
        model = mambamerge.create_model("videomamba_tiny", embed_dim=16, depth=3, num_frames=4, tubelet=2,
                                        img_size=(24, 32), patch_size=8, d_state=4, num_classes=5)
    else:
        model = mambamerge.create_model("aum_tiny", embed_dim=16, depth=3, spec_size=(32, 64), patch_size=16,
                                        stride=(8, 8), d_state=4, num_classes=5, variant=family.split(":")[1])
    return perturb_(model, seed=seed).to(dtype).eval()


def inputs(model, batch, seed, dtype=torch.float64):
    return torch.randn(batch, *model.input_shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@st.composite
def setups(draw, methods):
    family = draw(st.sampled_from(FAMILIES))
    method = draw(st.sampled_from(methods))
    seed = draw(st.integers(0, 10_000))
    model = small(family, seed)
    m = METHODS[method]()
    layout = model.layout
    removals, length = [0], layout.length
    for _ in range(len(model.layers) - 1):
        r = draw(st.integers(0, m.capacity(length, layout)))
        removals.append(r)
        length -= r
    return family, method, seed, model, removals, draw(st.integers(1, 3))


@SETTINGS
@given(setups(sorted(METHODS)))
def test_class_token_and_order_on_every_family(setup):
    family, method, seed, model, removals, batch = setup
    mambamerge.patch(model, method, schedule=removals, track_source=True)
    with torch.no_grad():
        state = model.token_state(inputs(model, batch, seed))
    layout = model.layout
    assert state.length == layout.length - sum(removals)
    rows = torch.arange(batch)
    # the class token holds itself only, sits in its original slot, and (VideoMamba) stays at the head
    assert (state.pos[rows, state.cls_index] == layout.cls_index).all()
    assert (state.size[rows, state.cls_index] == 1).all()
    assert (state.source[rows, state.cls_index].sum(dim=1) == 1).all()
    if layout.cls == "head":
        assert (state.cls_index == 0).all()
    if method in ORDER_PRESERVING:
        assert (state.pos.diff(dim=1) > 0).all()
    if method not in ("top", "random"):  # merges keep every patch
        assert (state.source.sum(dim=(1, 2)) == layout.length).all()


@SETTINGS
@given(setups(DETERMINISTIC))
def test_a_batch_equals_its_items_one_by_one_on_every_family(setup):
    family, method, seed, model, removals, batch = setup
    mambamerge.patch(model, method, schedule=removals)
    x = inputs(model, batch, seed)
    with torch.no_grad():
        together = model(x)
        one_by_one = torch.cat([model(x[i:i + 1]) for i in range(batch)])
    torch.testing.assert_close(together, one_by_one, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_reduction_is_bit_identical_on_every_family(family, method):
    model = small(family, dtype=torch.float32)
    x = inputs(model, 2, 0, torch.float32)
    with torch.no_grad():
        dense = model(x)
        mambamerge.patch(model, method, schedule=[0] * len(model.layers))
        assert torch.equal(model(x), dense)


def test_stm_merges_on_the_one_side_of_a_head_class_token():
    model = small("videomamba")
    length = model.layout.length  # 25: the class token and 24 patches after it
    most = METHODS["stm"]().capacity(length, model.layout)
    assert most == 10  # even distances 6, 8, ..., 24 (w_protect 4)
    mambamerge.patch(model, "stm", schedule=[0, most, 0], track_source=True)
    with torch.no_grad():
        state = model.token_state(inputs(model, 2, 0))
    assert (state.cls_index == 0).all() and (state.pos[:, :6] == torch.arange(6)).all()  # window kept
    with pytest.raises(ValueError, match="asks for 11 tokens before block 1, but only 10"):
        mambamerge.patch(model, "stm", schedule=[0, most + 1, 0])


def meta_model(name, **overrides):
    with torch.device("meta"):
        return mambamerge.create_model(name, **overrides)


def test_flops_follow_the_layout_and_the_mixer():
    video = meta_model("videomamba_tiny")
    report = flops(video)
    assert report.tokens == (1 + 8 * 196,) * 24
    assert report.patch_embed == 8 * 196 * 192 * 3 * 16 * 16
    assert flops(video, input_size=(16, 224, 224)).tokens[0] == 1 + 16 * 196
    per_token = {}
    for variant in ("Bi-Bi", "Fo-Bi", "Fo-Fo"):
        aum = meta_model("aum_tiny", variant=variant, num_classes=10)
        r = flops(aum)
        assert r.tokens[0] == 1 + 8 * 64 and r.head == 192 * 10
        per_token[variant] = (r.blocks_one_direction[0] // r.tokens[0], r.blocks_both_directions[0] // r.tokens[0])
    d, d_inner, n, rank = 192, 384, 16, 12
    shared, branch = 3 * d * d_inner, d_inner * 4 + d_inner * (rank + 2 * n) + rank * d_inner
    scan = 9 * d_inner * n + 2 * d_inner
    assert per_token["Bi-Bi"] == (shared + branch + scan, shared + 2 * branch + 2 * scan)
    assert per_token["Fo-Bi"] == (shared + branch + scan, shared + branch + 2 * scan)
    assert per_token["Fo-Fo"] == (shared + branch + scan, shared + branch + scan)
    assert flops(aum, input_size=(512, 128)).tokens[0] == 1 + 8 * 32


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_layout_without_class_token_merges_every_token_or_says_why_not(method):
    from mambamerge.merge.state import TokenState
    from mambamerge.tokens import SSMStats, TokenLayout

    layout = TokenLayout((3, 4), ("freq", "time"), "none")
    m = METHODS[method]()
    if method == "stm":
        with pytest.raises(ValueError, match="stm merges around the class token, and this model has none"):
            m.capacity(layout.length, layout)
        return
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, layout.length, 8, generator=gen, dtype=torch.float64)
    state = TokenState.start(tokens, layout, track_source=True).with_streams(tokens, 0.5 * tokens)
    assert state.cls_index is None and not state.cls_mask().any()
    delta = torch.rand(2, 4, layout.length, generator=gen, dtype=torch.float64)
    ssm = SSMStats(delta, delta, torch.randn(2, 3, layout.length, generator=gen, dtype=torch.float64),
                   torch.randn(2, 3, layout.length, generator=gen, dtype=torch.float64))
    r = min(m.capacity(layout.length, layout), 5)
    new = state.apply(m.plan(state, ssm, r))
    assert new.length == layout.length - r and new.cls_index is None
    assert (new.source.sum(dim=1) <= 1).all()
    with pytest.raises(ValueError, match="fused_slot='cls_next' needs a class token"):
        METHODS["evit"](fused_slot="cls_next").capacity(layout.length, layout)
