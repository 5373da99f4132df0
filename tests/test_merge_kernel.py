"""The compiled merge step and step-size means (inference) against the differentiable torch path."""
import pytest
import torch

import mambamerge
import mambamerge.ops as ops
from mambamerge.merge import METHODS
from mambamerge.merge.plan import MergePlan, plan_from_selection
from mambamerge.merge.state import TokenState
from mambamerge.ops import cpu_kernels, softplus_with_row_mean
from mambamerge.ops.cpu_kernels import library
from test_merge_properties import VARIANTS, small_model

needs_compiled = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")
CASES = [(m, o) for m in sorted(METHODS) for o in VARIANTS.get(m, [{}])]


def torch_path(plan: MergePlan, hidden, residual):
    return plan.combine(hidden if residual is None else residual + hidden)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_kernel_equals_torch_path_with_several_movers_per_token(dtype, mode, with_residual):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 12, 7, generator=gen, dtype=dtype)
    residual = torch.randn(2, 12, 7, generator=gen, dtype=dtype) if with_residual else None
    weight = torch.rand(2, 12, generator=gen) + 0.1
    src = torch.tensor([[1, 2, 3, 9], [0, 11, 5, 6]])
    dst = torch.tensor([[4, 4, 4, 10], [7, 7, 7, 7]])  # three and four tokens merging into one
    plan = plan_from_selection(12, src, dst, weight, mode=mode)
    size = torch.randint(1, 5, (2, 12), generator=gen).float()
    got, new_size = cpu_kernels.merge_apply(hidden, residual, size, plan.rep, plan.assign, plan.movers,
                                            plan.targets, plan.weight, mode == "mean")
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got, torch_path(plan, hidden, residual), rtol=tol, atol=tol)
    assert torch.equal(new_size, plan.add_up(size))
    tokens = hidden if residual is None else residual + hidden
    untouched = [j for j, old in enumerate(plan.rep[0].tolist()) if old not in (4, 10)]
    assert torch.equal(got[0, untouched], tokens[0, plan.rep[0, untouched]])


@needs_compiled
def test_kernel_handles_pruning_and_empty_steps():
    hidden, residual = torch.randn(3, 9, 5), torch.randn(3, 9, 5)
    plan = plan_from_selection(9, torch.tensor([[0, 8], [1, 2], [3, 7]]), None, torch.ones(3, 9))
    size = torch.arange(27.0).view(3, 9)
    got, new_size = cpu_kernels.merge_apply(hidden, residual, size, plan.rep, plan.assign, plan.movers,
                                            plan.targets, plan.weight, True)
    assert torch.equal(got, torch_path(plan, hidden, residual)) and torch.equal(new_size, plan.add_up(size))


@needs_compiled
@pytest.mark.parametrize("method,options", CASES)
def test_inference_path_equals_the_differentiable_one(method, options):
    """The same patched model with and without gradients: compiled merge kernel and step-size means
    from the softplus pass against torch's operations."""
    model = small_model(grid=6, depth=4, dim=16, seed=3)
    images = torch.randn(2, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = mambamerge.patch(model, method, schedule=[0, 9, 6, 4], **options)(images)
    # patched afresh: random pruning draws the same tokens again
    slow = mambamerge.patch(model, method, schedule=[0, 9, 6, 4], **options)(images.requires_grad_())
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-10, atol=1e-10)


@needs_compiled
def test_softplus_row_mean():
    x = torch.randn(3, 50, 384) * 3 - 2
    y, mean = softplus_with_row_mean(x)
    torch.testing.assert_close(y, torch.nn.functional.softplus(x), rtol=2e-6, atol=0)
    torch.testing.assert_close(mean, y.mean(dim=-1), rtol=1e-6, atol=0)
    grad_x = x.clone().requires_grad_()
    y, mean = softplus_with_row_mean(grad_x)  # needs a gradient: differentiable torch operations
    mean.sum().backward()
    torch.testing.assert_close(grad_x.grad, torch.sigmoid(x) / 384)


def test_mixer_reports_the_mean_step_size(tiny_model):
    tokens = tiny_model.embed(torch.randn(2, 3, *tiny_model.cfg.img_size))
    with torch.no_grad():
        _, _, ssm = tiny_model.layers[0](tokens, None, return_ssm=True)
    for mean, delta in zip(ssm.mean_delta(), (ssm.delta_fwd, ssm.delta_bwd)):
        torch.testing.assert_close(mean, delta.mean(dim=1), rtol=1e-6, atol=1e-7)


@needs_compiled
@pytest.mark.parametrize("merging", [True, False])
def test_compiled_plan_equals_torch_plan(monkeypatch, merging):
    gen = torch.Generator().manual_seed(5)
    for length, r in [(2, 1), (9, 4), (197, 98), (50, 0)]:
        src = torch.stack([torch.randperm(length, generator=gen)[:r] for _ in range(3)])
        survivors = [sorted(set(range(length)) - set(row.tolist())) for row in src]
        dst = torch.tensor([[s[int(i)] for i in torch.randint(len(s), (r,), generator=gen)] for s in survivors])
        dst = dst.view(3, r) if merging else None
        weight = torch.rand(3, length, generator=gen)
        fast = plan_from_selection(length, src, dst, weight)
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "can_plan", lambda src: False)
            slow = plan_from_selection(length, src, dst, weight)
        assert torch.equal(fast.rep, slow.rep) and torch.equal(fast.assign, slow.assign)


@needs_compiled
def test_compiled_plan_rejects_inconsistent_selections():
    with pytest.raises(ValueError, match="distinct tokens"):
        plan_from_selection(5, torch.tensor([[1, 1]]), None, torch.ones(1, 5))
    with pytest.raises(ValueError, match="survivors"):
        plan_from_selection(5, torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), torch.ones(1, 5))


def test_merging_the_stream_sum_keeps_stochastic_depth():
    """Training with drop path: merging residual + drop_path(hidden) once (the model) equals merging
    both streams apart and letting the next block add them under its drop path (the definition)."""
    model = mambamerge.create_model("vim_pico", embed_dim=16, depth=4, img_size=24, patch_size=4, stride=4,
                                    d_state=4, num_classes=5, drop_path_rate=0.6).to(torch.float64)
    model.load_state_dict(small_model(grid=6, depth=4, dim=16, seed=5).state_dict())
    model.train()
    schedule = [0, 9, 6, 4]
    method = METHODS["tome"]()
    images = torch.randn(4, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(7)
    got = mambamerge.patch(model, "tome", schedule=schedule)(images)
    mambamerge.unpatch(model)

    torch.manual_seed(7)
    tokens = model.embed(images)
    state = TokenState.start(tokens, model.layout)
    for i, block in enumerate(model.layers):
        hidden, residual = block(state.hidden, state.residual)
        state = state.with_streams(hidden, residual)
        if i + 1 < len(schedule) and schedule[i + 1]:
            plan = method.plan(state, None, schedule[i + 1])
            state = TokenState(plan.combine(hidden), plan.combine(residual), plan.add_up(state.size),
                               state.pos.gather(1, plan.rep), plan.assign.gather(1, state.cls_index[:, None])[:, 0])
    features = model.final_norm(state.hidden, state.residual)[torch.arange(4), state.cls_index]
    torch.testing.assert_close(got, model.head(features), rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the drop path was active: without it the output differs
        assert not torch.allclose(got, mambamerge.patch(model.eval(), "tome", schedule=schedule)(images))


@needs_compiled
@pytest.mark.parametrize("method", ["mame", "stm", "tome", "random"])
def test_without_the_compiled_library_everything_falls_back_to_torch(monkeypatch, method):
    """A machine without a compiler runs softplus, plans and merges as torch operations, with the same result."""
    model = small_model(grid=6, depth=4, dim=16, seed=8)
    images = torch.randn(2, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        fast = mambamerge.patch(model, method, schedule=[0, 9, 6, 4])(images)
        monkeypatch.setattr(library, "_loaded", library.Loaded(None, None, "no compiler (test)"))
        monkeypatch.setattr(ops, "_warned_fallback", False)
        with pytest.warns(RuntimeWarning, match="no compiler"):
            slow = mambamerge.patch(model, method, schedule=[0, 9, 6, 4])(images)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
