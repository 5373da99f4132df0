"""The Triton selective scan (ops/triton_scan.py) and the mixer path on it, run on the CPU by Triton's
interpreter (triton_interpreter.py): against the float64 reference scan and its autograd, both
directions, every input dtype, lengths that are not multiples of the chunk."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed: `./run.sh test` installs requirements-test.lock")

import mambamerge  # noqa: E402
from mambamerge import ops  # noqa: E402
from mambamerge.models.blocks import MambaMixer  # noqa: E402
from mambamerge.ops import selective_scan, selective_scan_reference  # noqa: E402
from mambamerge.ops.triton_scan import selective_scan_triton  # noqa: E402
from test_fused import FAMILIES, VARIANTS, inputs, small, small_mixer  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(length, batch=2, dim=5, n_state=3, seed=0):
    """float64 inputs in the kernel's layouts, dt before its bias (softplus(dt + bias) reaches ~3)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    u, dt, z = randn(batch, dim, length), randn(batch, dim, length), randn(batch, dim, length)
    B, C = randn(batch, n_state, length), randn(batch, n_state, length)
    A = -torch.exp(randn(dim, n_state))
    return dict(u=u, delta=dt, A=A, B=B, C=C, D=randn(dim), z=z, delta_bias=0.5 * randn(dim))


def reference(t, reverse):
    """(out, Δ, mean Δ) of the kernel's semantics from the reference scan, float64 autograd."""
    delta = F.softplus(t["delta"] + t["delta_bias"][:, None])
    y = selective_scan_reference(t["u"].mT, delta.mT, t["A"], t["B"].mT, t["C"].mT, t["D"], reverse=reverse).mT
    return y * F.silu(t["z"]), delta, delta.mean(dim=1)


def grads_of(outputs, weights, leaves):
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, leaves)


def check_against_reference(dtype, length, reverse, rtol):
    """Forward outputs and all eight gradients (through out, Δ and mean Δ) of the kernel run on `dtype`
    inputs, against the float64 reference on the same rounded values; errors relative to each tensor's
    largest magnitude."""
    batch = 1 if length > 512 else 2  # (the interpreter runs one program at a time)
    truth = {name: t.to(dtype).double().requires_grad_() for name, t in scan_inputs(length, batch).items()}
    ours = {name: t.detach().to(torch.float32 if name in ("A", "D", "delta_bias") else dtype).requires_grad_()
            for name, t in truth.items()}
    expected = reference(truth, reverse)
    got = selective_scan_triton(**ours, delta_softplus=True, reverse=reverse, report=True)
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32
    weights = [torch.randn(e.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i, e in enumerate(expected)]
    pairs = list(zip(("out", "delta", "mean delta"), got, expected))
    pairs += zip((f"grad of {name}" for name in NAMES), grads_of(got, weights, list(ours.values())),
                 grads_of(expected, weights, list(truth.values())))
    for what, g, e in pairs:
        scale = e.abs().max().item() + 1e-12
        error = (g.double() - e).abs().max().item() / scale
        assert error < rtol, f"{what}: max error {error:.2e} of its largest magnitude {scale:.3g} (L={length})"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("length", [1, 2, 197, 1025])
def test_float32_forward_and_backward_match_the_reference(length, reverse):
    check_against_reference(torch.float32, length, reverse, rtol=2e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs_accumulate_in_float32(dtype, reverse):
    # the inputs are rounded for both sides; what is left is the rounding of the outputs and gradients
    check_against_reference(dtype, 197, reverse, rtol=1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_impl_triton_takes_the_sequence_major_layout(reverse):
    gen = torch.Generator().manual_seed(1)
    u, delta = torch.randn(2, 37, 6, generator=gen), torch.rand(2, 37, 6, generator=gen)
    B, C = torch.randn(2, 37, 4, generator=gen), torch.randn(2, 37, 4, generator=gen)
    A, D = -torch.rand(6, 4, generator=gen) * 3, torch.randn(6, generator=gen)
    got = selective_scan(u, delta, A, B, C, D, reverse=reverse, impl="triton")
    want = selective_scan_reference(*(t.double() for t in (u, delta, A, B, C, D)), reverse=reverse)
    assert got.shape == u.shape and got.dtype == u.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    t = {name: v.float() for name, v in scan_inputs(7).items()}
    with pytest.raises(ValueError, match=r"B has shape \(2, 3, 6\), expected \(2, 3, 7\)"):
        selective_scan_triton(**{**t, "B": t["B"][..., :6]})
    with pytest.raises(ValueError, match="float32, float16 or bfloat16 tensors; u is torch.float64"):
        selective_scan_triton(**{**t, "u": t["u"].double()})


def set_impl(model, impl):
    for mixer in (m for m in model.modules() if isinstance(m, MambaMixer)):
        mixer.scan_impl = impl


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_logits_equal_the_pytorch_path(family):
    model = small(family, depth=1)
    x = inputs(model)
    with torch.no_grad():
        normal = model(x)
        set_impl(model, "triton")
        got = model(x)
    torch.testing.assert_close(got, normal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,divide_out", VARIANTS)
def test_mixer_reports_the_same_ssm_stats_and_gradients(variant, divide_out):
    mixer = small_mixer(variant, divide_out)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    results = []
    for impl in ("auto", "triton"):
        mixer.scan_impl = impl
        out, stats = mixer(hidden, return_ssm=True)
        loss = out.square().sum() + sum(s.sum() for s in stats)
        results.append((out, stats, torch.autograd.grad(loss, [hidden, *mixer.parameters()])))
    (out, stats, grads), (t_out, t_stats, t_grads) = results
    torch.testing.assert_close(t_out, out, rtol=1e-5, atol=1e-5)
    for expected, got in zip(stats, t_stats):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    names = ["hidden"] + [name for name, _ in mixer.named_parameters()]
    for name, expected, got in zip(names, grads, t_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    with torch.no_grad():  # the report changes nothing in the output
        torch.testing.assert_close(mixer(hidden), mixer(hidden, return_ssm=True)[0], rtol=0, atol=0)


@pytest.mark.parametrize("method,reduction", [("mame", 0.3), ("stm", 0.1)])
def test_merged_model_equals_the_pytorch_path(method, reduction):
    model = small("vim", depth=3)
    mambamerge.patch(model, method, reduction=reduction)
    x = inputs(model)
    with torch.no_grad():
        normal = model(x)
        set_impl(model, "triton")
        got = model(x)
    torch.testing.assert_close(got, normal, rtol=1e-5, atol=1e-5)


def test_auto_prefers_mamba_ssm_then_triton_on_cuda():
    if ops.fused_kernels() is None:
        assert ops.mixer_backend("cuda") == "triton"
    assert ops.scan_backend("cuda") == ("mamba_ssm" if ops._mamba_ssm_fn() is not None else "triton")
    assert ops.mixer_backend("cpu") == ops.scan_backend("cpu")  # CPU tensors keep the CPU kernels


def test_triton_refuses_what_the_kernels_cannot_run():
    mixer = small_mixer("bi", True).double()
    with pytest.raises(ValueError, match="scan_impl='triton': the Triton kernels take float32, float16 or "
                                         "bfloat16 CUDA tensors, the mixer's input is torch.float64"):
        mixer.scan_impl = "triton"
        mixer(torch.randn(1, 5, 16, dtype=torch.float64))
