"""Properties every token-reduction method must keep, checked over random models, batches and schedules."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mambamerge
from mambamerge.merge import METHODS
from mambamerge.tokens import TokenLayout
from conftest import perturb_

# tome_unordered scrambles the order by design; evit appends its fused token after the survivors
ORDER_PRESERVING = sorted(set(METHODS) - {"tome_unordered", "evit"})
DETERMINISTIC = sorted(set(METHODS) - {"random"})
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# non-default options worth covering; every other method runs with its defaults
VARIANTS = {
    "mame": [{}, {"match": "window", "window": 1}, {"match": "bipartite"}, {"placement": "important"},
             {"weight": "size", "feature": "hidden"}, {"sources": "most_delta", "match": "window"},
             {"sources": "spread", "w_protect": 2, "keep_top": 0.3, "cap": 1}, {"sources": "pairs", "weight": "plain"},
             {"sources": "spread", "match": "window", "window": 1, "cap": 2, "importance": "injection"},
             {"match": "bipartite", "w_protect": 3}, {"sources": "pairs", "w_protect": 2, "placement": "important"},
             {"sources": "spread", "match": "window", "window": 2}],
    "mtr": [{}, {"keep_top": 0.0, "weight": "size"}, {"keep_top": 0.9, "feature": "hidden"}],
    "stm": [{}, {"mode": "sum"}, {"weight": "size"}, {"fading": 1.0, "w_protect": 0}],
}


def small_model(grid, depth, dim, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    model = mambamerge.create_model("vim_pico", embed_dim=dim, depth=depth, img_size=4 * grid, patch_size=4,
                                    stride=4, d_state=4, num_classes=5)
    return perturb_(model, seed=seed).to(dtype).eval()


@st.composite
def setups(draw, methods):
    method = draw(st.sampled_from(methods))
    options = draw(st.sampled_from(VARIANTS.get(method, [{}])))
    grid = draw(st.integers(3, 7))
    depth = draw(st.integers(2, 5))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    m = METHODS[method](**options)
    layout = TokenLayout((grid, grid), ("row", "col"), "middle")
    removals, length = [0], layout.length
    for _ in range(depth - 1):
        r = draw(st.integers(0, m.capacity(length, layout)))
        removals.append(r)
        length -= r
    return method, options, grid, depth, batch, seed, removals


def run_patched(method, options, grid, depth, batch, seed, removals):
    model = small_model(grid, depth, dim=16, seed=seed)
    mambamerge.patch(model, method, schedule=removals, track_source=True, **options)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1])) for b in model.layers]
    images = torch.randn(batch, 3, 4 * grid, 4 * grid, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        feats = model.pooled_features(images)
    for h in hooks:
        h.remove()
    return model, images, feats, seen


@SETTINGS
@given(setups(sorted(METHODS)))
def test_bookkeeping_never_lies(setup):
    method, _, grid, depth, batch, seed, removals = setup
    model, images, _, seen = run_patched(*setup)
    patches = grid * grid
    assert seen == mambamerge.merge.schedule.Schedule(tuple(removals)).token_counts(patches + 1)
    with torch.no_grad():
        state = model.token_state(images)
    rows = torch.arange(batch)
    cls = model.cls_index
    # the class token: never merged, never pruned, index exact
    assert (state.pos[rows, state.cls_index] == cls).all()
    assert (state.size[rows, state.cls_index] == 1).all()
    expected_cls_row = torch.zeros(patches + 1, dtype=state.source.dtype)
    expected_cls_row[cls] = 1
    assert (state.source[rows, state.cls_index] == expected_cls_row).all()
    # sizes: merges keep every patch, pruning loses exactly the dropped ones
    non_cls = ~state.cls_mask()
    total = (state.size * non_cls).sum(dim=1)
    assert torch.equal(total, state.source.sum(dim=(1, 2)) - 1)
    assert torch.equal(state.size, state.source.sum(dim=2))
    if method in ("mame", "stm", "tome", "tome_unordered", "rmeeto", "evit"):
        assert (total == patches).all()
    # each original token is held by at most one token
    assert (state.source.sum(dim=1) <= 1).all()
    # every token's slot is one of the tokens it holds
    assert (state.source.gather(2, state.pos[..., None])[..., 0] == 1).all()
    if method in ORDER_PRESERVING and setup[1].get("placement") != "important":
        assert (state.pos.diff(dim=1) > 0).all()


@SETTINGS
@given(setups(DETERMINISTIC))
def test_a_batch_equals_its_images_one_by_one(setup):
    batch = setup[4]
    model, images, feats, _ = run_patched(*setup)
    with torch.no_grad():
        single = torch.cat([model.pooled_features(images[i:i + 1]) for i in range(batch)])
    torch.testing.assert_close(feats, single, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_reduction_is_bit_identical(method):
    model = small_model(grid=6, depth=3, dim=16, seed=0, dtype=torch.float32)
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        dense = model(images)
        for kwargs in ({"reduction": 0.0}, {"r": 0}, {"schedule": [0, 0, 0]}):
            mambamerge.patch(model, method, **kwargs)
            assert torch.equal(model(images), dense)
        mambamerge.unpatch(model)
        assert torch.equal(model(images), dense)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradients_flow_through_reduced_tokens(method):
    model = small_model(grid=6, depth=3, dim=16, seed=1, dtype=torch.float32).train()
    mambamerge.patch(model, method, schedule=[0, 8, 4])
    images = torch.randn(2, 3, 24, 24, requires_grad=True)
    model(images).logsumexp(dim=1).sum().backward()
    assert images.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.layers[-1].mixer.in_proj.weight.grad.abs().sum() > 0


def test_patch_keeps_the_state_dict_and_round_trips(tmp_path):
    model = small_model(grid=6, depth=3, dim=16, seed=2, dtype=torch.float32)
    before = model.state_dict()
    mambamerge.patch(model, "mame", reduction=0.3)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    path = mambamerge.save_checkpoint(model, tmp_path / "m.safetensors")
    assert mambamerge.load_checkpoint(path, img_size=24).token_reducer is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="mame", reduction=1.0), r"reduction must be in \[0, 1\)"),
    (dict(method="mame", reduction=-0.1), r"reduction must be in \[0, 1\)"),
    (dict(method="merge_everything", reduction=0.2), "unknown method 'merge_everything'; available: .*mame"),
    (dict(method="mame", reduction=0.2, colour="red"), "unknown option.*colour.*match='global'"),
    (dict(method="mame", schedule=[0, 1, 1, 1]), "schedule has 4 entries but the model has only 3 blocks"),
    (dict(method="mame", schedule=[0, 40, 0]), "asks for 40 tokens before block 1, but only 35"),
    (dict(method="mame", schedule=[2, 0, 0]), "nothing can be removed before block 0"),
    (dict(method="mame", schedule=[0, -1, 0]), "must be >= 0"),
    (dict(method="mame", schedule="fast"), "unknown schedule 'fast'"),
    (dict(method="mame", reduction=0.6, schedule="constant"), "cannot reach an average reduction of 60%.*most"),
    (dict(method="mame", reduction=0.2, schedule=[0, 1, 1]), "either an explicit schedule list or a target"),
    (dict(method="mame", match="nearest"), "mame: match must be"),
    (dict(method="stm", w_protect=-1), "w_protect must be >= 0"),
])
def test_bad_arguments_get_clear_errors(kwargs, message):
    model = small_model(grid=6, depth=3, dim=16, seed=0, dtype=torch.float32)
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=message):
        mambamerge.patch(model, method, **kwargs)


def test_patching_something_else_is_a_clear_error():
    with pytest.raises(TypeError, match="not a model mambamerge can patch"):
        mambamerge.patch(torch.nn.Linear(3, 3), "mame", reduction=0.2)


def test_default_schedule_steps_every_second_block_and_every_block_when_needed():
    from mambamerge.merge.schedule import resolve
    from mambamerge.merge.tome import bipartite_capacity

    gentle = resolve(12, 197, bipartite_capacity, reduction=0.4)
    assert [b for b, r in enumerate(gentle.removals) if r] == [1, 3, 5, 7, 9, 11]
    steep = resolve(12, 197, bipartite_capacity, reduction=0.8)
    assert abs(steep.average_reduction(197) - 0.8) < 0.02 and steep.removals[2] > 0
    with pytest.raises(ValueError, match="the most it can reach 74"):
        resolve(12, 197, bipartite_capacity, reduction=0.8, every=2)
