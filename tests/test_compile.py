"""torch.compile captures dense and token-reducing models whole on CPU: the compiled kernels are torch
custom ops (torch.ops.mambamerge.*) and the reduction steps have data-independent shapes."""
import pytest
import torch

import mambamerge
from mambamerge.ops import cpu_kernels

from conftest import perturb_

needs_compiled = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")

# the default settings of each method, and the options that take another code path in the plan
CASES = [
    (None, {}),
    ("mame", {}),
    ("mame", {"placement": "important"}),
    ("stm", {"w_protect": 0}),
    ("tome_unordered", {}),
    ("evit", {}),
    ("random", {}),
    ("mame", {"sources": "random"}),
]


def selection_op(method, options):
    """The selection kernel a case's step calls, or None where its choice is torch operations."""
    if method == "mame":
        return "mambamerge.select_mame"
    return {"stm": "mambamerge.select_adjacent", "tome_unordered": "mambamerge.select_bipartite"}.get(method)


def make_model(method, options, depth=2):
    torch.manual_seed(0)
    model = perturb_(mambamerge.create_model("vim_pico", depth=depth)).eval()
    if method is not None:
        mambamerge.patch(model, method, schedule=[0, 5] + [0] * (depth - 2), **options)
    return model


class GraphRecorder:
    """A torch.compile backend that keeps the FX graphs dynamo captures and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def custom_ops(self):
        """Names of the mambamerge custom ops called in the captured graphs, with repeats."""
        return sorted(str(node.target).removesuffix(".default") for gm in self.graphs for node in gm.graph.nodes
                      if node.op == "call_function" and str(node.target).startswith("mambamerge."))


@needs_compiled
@pytest.mark.parametrize("impl", ["auto", "compiled"])
@pytest.mark.parametrize("method, options", CASES)
def test_compile_captures_one_graph_that_calls_the_kernels_and_matches_eager(method, options, impl):
    """impl "auto": each block one whole-mixer kernel call; "compiled": the per-step kernels between
    torch's projections."""
    torch._dynamo.reset()
    model = make_model(method, options).set_scan_impl(impl)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eager = make_model(method, options).set_scan_impl(impl)  # its own copy: a random method's draws advance
    recorder = GraphRecorder()
    with torch.no_grad():
        expected = eager(images)
        compiled_model = torch.compile(model, backend=recorder, fullgraph=True)  # fullgraph: a break is an error
        got = compiled_model(images)
        torch.testing.assert_close(compiled_model(images), eager(images), rtol=0, atol=0)  # the next draws too
    assert len(recorder.graphs) == 1  # and no recompile for the second forward
    ops = recorder.custom_ops()
    if impl == "auto":
        assert ops.count("mambamerge.mixer_forward") == 2 and "mambamerge.selective_scan" not in ops
    else:  # every block: two scans and two softplus passes (the row-mean variant where the method reads Δ)
        assert ops.count("mambamerge.selective_scan") == 4 and "mambamerge.mixer_forward" not in ops
        assert sum(op.startswith("mambamerge.softplus") for op in ops) == 4
    if method is not None:
        assert "mambamerge.merge_apply" in ops
    if method in ("mame", "stm"):  # the others reorder the survivors, which the planning kernel does not
        assert "mambamerge.plan_from_selection" in ops
    if selection_op(method, options):
        assert ops.count(selection_op(method, options)) == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(not cpu_kernels.bf16_mixer_available(), reason="torch exports no bf16 gemm")
def test_compile_under_bf16_autocast_captures_the_kernel_with_bf16_products():
    torch._dynamo.reset()
    model = make_model("mame", {})
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    recorder = GraphRecorder()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(images)
        got = torch.compile(model, backend=recorder, fullgraph=True)(images)
    calls = [node for gm in recorder.graphs for node in gm.graph.nodes
             if str(node.target).removesuffix(".default") == "mambamerge.mixer_forward"]
    assert len(recorder.graphs) == 1 and len(calls) == 2
    assert all(node.args[-1] is True for node in calls)  # bf16 products
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_compiled
def test_compiled_training_step_of_a_merging_model_has_the_eager_gradients():
    """AOTAutograd traces the registered backward of the scan and softplus ops, and the differentiable
    merge (torch operations) between the blocks."""
    torch._dynamo.reset()
    model = make_model("tome", {}).train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        model.zero_grad()
        fn(images).square().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected = grads(model)
    got = grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@needs_compiled
@pytest.mark.parametrize("method", [None, "mame", "random"])
def test_inductor_compiled_model_matches_eager(method):
    torch._dynamo.reset()
    model, eager = make_model(method, {}), make_model(method, {})
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    compiled_model = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):  # a random method's second draws too
            torch.testing.assert_close(compiled_model(images), eager(images), rtol=1e-4, atol=1e-5)
