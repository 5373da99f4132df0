"""The selection kernels (one call per step at inference: cpu_kernels.select_*) against the torch functions
they stand for, which stay the training path."""
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import mambamerge
from mambamerge.merge import METHODS
from mambamerge.merge.plan import plan_from_selection
from mambamerge.merge.matching import most_similar, near_class_token, similarities, spread_sources, uniform_sources
from mambamerge.merge.state import TokenState
from mambamerge.merge.tome import bipartite_match
from mambamerge.ops import cpu_kernels
from mambamerge.tokens import TokenLayout

needs_compiled = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")
# every property test draws its features from these
FEATURES = dict(seed=st.integers(0, 2**16), batch=st.integers(1, 3), dim=st.integers(4, 40),
                dtype=st.sampled_from([torch.float32, torch.float64]))


def features(seed, batch, length, dim, dtype):
    """(batch, length, dim) Gaussian features: no two similarities tie (a tie may be broken either way)."""
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def torch_only():
    """Within the block, the torch path: the selection kernels are refused."""
    return mock.patch.object(cpu_kernels, "can_select", lambda feat: False)


@needs_compiled
@settings(max_examples=60, deadline=None)
@given(length=st.integers(3, 60), with_cls=st.booleans(), reach=st.sampled_from([0, 1, 3]),
       sources=st.sampled_from(["uniform", "spread", "least"]), data=st.data(), **FEATURES)
def test_mame_equals_the_torch_sources_and_match(seed, batch, length, dim, dtype, with_cls, reach, sources, data):
    """MaMe's sources "uniform" (no score), "spread" (the lowest score of each run) or the r lowest scores
    (least_delta, most_delta, random: their keys) with its match "global" (reach 0) or "window"."""
    x = features(seed, batch, length, dim, dtype)
    cls = None
    width = 0
    if with_cls:
        cls = torch.tensor(data.draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch)))
        width = data.draw(st.integers(0, (length - 3) // 2))
    allowed = torch.ones(batch, length, dtype=torch.bool) if cls is None else ~near_class_token(cls, length, width)
    r = data.draw(st.integers(0, int(allowed.sum(dim=1).min()) - 1))  # r sources and a destination
    score = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed))
    if sources == "uniform":
        src, dst = cpu_kernels.select_mame(x, cls, None, width, reach, r)
        expected_src = uniform_sources(cls, batch, length, width, r, x.device)
    elif sources == "spread":
        src, dst = cpu_kernels.select_mame(x, cls, score, width, reach, r)
        expected_src = spread_sources(score, allowed, r)
    else:
        src, dst = cpu_kernels.select_mame(x, cls, score, width, reach, r, least=True)
        expected_src = score.masked_fill(~allowed, float("inf")).topk(r, dim=1, largest=False).indices
    local = (torch.arange(length)[None, None, :] - expected_src[..., None]).abs() <= reach if reach else None
    expected_dst = most_similar(similarities(x, expected_src), allowed.scatter(1, expected_src, False), local=local)
    assert torch.equal(src, expected_src) and torch.equal(dst, expected_dst)


@needs_compiled
@settings(max_examples=60, deadline=None)
@given(length=st.integers(4, 60), penalised=st.booleans(), data=st.data(), **FEATURES)
def test_bipartite_equals_the_torch_match(seed, batch, length, dim, dtype, penalised, data):
    x = features(seed, batch, length, dim, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    protected = torch.rand(batch, length, generator=gen) < data.draw(st.sampled_from([0.0, 0.2]))
    protected[:, 1] = False  # an odd token that may receive
    r = data.draw(st.integers(0, int((~protected[:, 0::2]).sum(dim=1).min())))
    penalty = torch.rand(batch, length, generator=gen, dtype=dtype) if penalised else None
    src, dst = cpu_kernels.select_bipartite(x, protected, penalty, r)
    with torch_only():
        expected_src, expected_dst = bipartite_match(x, protected, r, penalty)
    assert torch.equal(src, expected_src) and torch.equal(dst, expected_dst)


def stm_state(x, cls_index):
    batch, length, _ = x.shape
    layout = TokenLayout((length - 1,), ("time",), cls="middle")
    state = TokenState.start(x, layout)
    return TokenState(hidden=x, residual=None, size=state.size, pos=state.pos,
                      cls_index=torch.as_tensor(cls_index).expand(batch).clone())


@needs_compiled
@settings(max_examples=60, deadline=None)
@given(length=st.integers(4, 60), w_protect=st.integers(0, 6), fading=st.sampled_from([0.0, 1.0]), head=st.booleans(),
       data=st.data(), **FEATURES)
def test_adjacent_equals_the_torch_pairs(seed, batch, length, dim, dtype, w_protect, fading, head, data):
    x = features(seed, batch, length, dim, dtype)
    method = METHODS["stm"](w_protect=w_protect, fading=fading, weight="size")
    cls = 0 if head else (length - 1) // 2
    n = length - 1 if head else max((length - 1) // 2 - 1, 0)
    capacity = method._side_capacity(n) * (1 if head else 2)
    assume(capacity > 0)  # a step removes at least one token
    r = data.draw(st.integers(1, capacity))
    state = stm_state(x, cls)
    src, dst = cpu_kernels.select_adjacent(x, state.cls_index, w_protect, r, fading, method.gamma)
    with torch_only():
        expected_src, expected_dst = method._pairs(state, x, r)
    assert torch.equal(src, expected_src) and torch.equal(dst, expected_dst)


@needs_compiled
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_image_of_nan_or_inf_still_gets_a_valid_selection(bad):
    """NaN similarities rank above every number (as in torch's max and topk); each kernel still picks r
    distinct sources and destinations that stay."""
    x = features(1, 2, 31, 8, torch.float32)
    x[0, 7] = bad
    x[1] = bad
    cls = torch.tensor([15, 15])
    selections = [cpu_kernels.select_mame(x, cls, None, 3, 0, 6), cpu_kernels.select_mame(x, cls, None, 3, 2, 6),
                  cpu_kernels.select_adjacent(x, cls, 4, 6, 0.0, 0.8),
                  cpu_kernels.select_bipartite(x, torch.arange(31)[None].expand(2, -1) == 15, None, 6)]
    for src, dst in selections:
        plan = plan_from_selection(31, src, dst, torch.ones(2, 31))  # raises unless src distinct and dst stays
        assert plan.new_length == 25 and not bool((src == 15).any() | (dst == 15).any())
    allowed = ~near_class_token(cls, 31, 3)
    for reach, (src, dst) in zip((0, 2), selections):  # MaMe's: the very tokens torch's argmax picks
        local = (torch.arange(31)[None, None, :] - src[..., None]).abs() <= reach if reach else None
        assert torch.equal(dst, most_similar(similarities(x, src), allowed.scatter(1, src, False), local=local))


@needs_compiled
def test_adjacent_names_a_side_without_enough_pairs():
    x = features(0, 1, 21, 8, torch.float32)
    with pytest.raises(ValueError, match="fewer adjacent pairs.*w_protect=4"):
        cpu_kernels.select_adjacent(x, torch.tensor([10]), 4, 8, 0.0, 0.8)


@needs_compiled
@pytest.mark.parametrize("method,options,kernel", [
    ("mame", {}, "select_mame"), ("mame", {"match": "window", "sources": "spread"}, "select_mame"),
    ("mame", {"sources": "least_delta", "w_protect": 0}, "select_mame"),
    ("mame", {"match": "bipartite"}, "select_bipartite"), ("tome", {}, "select_bipartite"),
    ("rmeeto", {}, "select_bipartite"), ("stm", {}, "select_adjacent")])
def test_each_method_selects_in_one_call_at_inference_and_in_torch_for_training(monkeypatch, method, options, kernel):
    model = mambamerge.create_model("vim_pico", depth=3).eval()
    mambamerge.patch(model, method, schedule=[0, 2, 2], **options)
    calls = []
    real = getattr(cpu_kernels, kernel)
    monkeypatch.setattr(cpu_kernels, kernel, lambda *args: calls.append(args) or real(*args))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(images)
    assert len(calls) == 2
    model(images.requires_grad_())  # features that need a gradient: the torch functions
    assert len(calls) == 2


@needs_compiled
@pytest.mark.parametrize("method", ["mame", "stm", "tome", "rmeeto"])
def test_the_trained_demo_model_predicts_the_same_with_either_path(method):
    """Real features (the shipped demo model on 256 Fashion-MNIST test images, half the tokens merged),
    where background patches are alike: the kernels and the torch functions predict the same classes,
    and all but the rare image whose similarities tie within float rounding get the same logits."""
    from mambamerge.checkpoint import load_checkpoint
    from mambamerge.cli.demo import demo_checkpoint
    from mambamerge.data import load_dataset

    model = load_checkpoint(str(demo_checkpoint()))
    data = load_dataset("fashion-mnist", "test", input_shape=tuple(model.input_shape), limit=256)
    images = torch.stack([data[i][0] for i in range(len(data))])
    mambamerge.patch(model, method, reduction=0.5)
    with torch.inference_mode():
        fast = model(images)
        with torch_only():
            slow = model(images)
    assert torch.equal(fast.argmax(dim=1), slow.argmax(dim=1))
    same = torch.isclose(fast, slow, rtol=1e-5, atol=1e-5).all(dim=1)
    assert same.float().mean() >= 0.99
