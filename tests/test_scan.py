"""Selective scan implementations against the reference loop."""
import functools
import warnings

import pytest
import torch

import mambamerge.ops as ops
from mambamerge.ops.cpu_kernels import library
from mambamerge.ops.cpu_kernels.build import build_library
from mambamerge.ops import cpu_kernels, scan_backend, selective_scan, selective_scan_compiled, selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D")
# (batch, L, d, N): odd lengths, d below / at / above one 16-channel block, N 1, 4, 16
SHAPES = [(1, 1, 5, 1), (3, 2, 17, 4), (1, 7, 16, 16), (3, 33, 37, 16), (1, 33, 3, 4)]

needs_compiled = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")
IMPLS = [pytest.param("compiled", marks=needs_compiled), "loop", "parallel", "reference"]


def make_inputs(batch, length, d, n_state, dtype=torch.float64, seed=0):
    """Random scan inputs: delta in (0, 1], A in [-16, 0)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = (
        randn(batch, length, d),
        1 - rand(batch, length, d),
        -16 * (1 - rand(d, n_state)),
        randn(batch, length, n_state),
        randn(batch, length, n_state),
        randn(d),
    )
    return tuple(t.to(dtype) for t in inputs)


def run_with_grads(fn, inputs, reverse, seed=1):
    """y and the gradients of <y, dy> for a fixed random dy, for all six inputs."""
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    y = fn(*inputs, reverse=reverse)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    # materialize: with L = 1, parallel never touches A (its gradient is zero)
    grads = torch.autograd.grad(y, inputs, dy, materialize_grads=True)
    return y.detach(), grads


@functools.lru_cache(maxsize=None)
def reference_result(shape, reverse):
    return run_with_grads(selective_scan_reference, make_inputs(*shape), reverse)


def assert_all_close(got, expected, atol, rtol):
    (y, grads), (y_ref, grads_ref) = got, expected
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol, msg=lambda m: f"y: {m}")
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=atol, rtol=rtol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_float64_matches_reference(impl, shape, reverse):
    got = run_with_grads(functools.partial(selective_scan, impl=impl), make_inputs(*shape), reverse)
    assert_all_close(got, reference_result(shape, reverse), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_close_to_float64_truth(impl, reverse):
    shape = (3, 33, 37, 16)
    y, grads = run_with_grads(functools.partial(selective_scan, impl=impl), make_inputs(*shape, torch.float32), reverse)
    assert y.dtype == torch.float32
    got = (y.double(), tuple(g.double() for g in grads))
    assert_all_close(got, reference_result(shape, reverse), atol=1e-4, rtol=1e-4)


@needs_compiled
def test_compiled_float32_handles_vanishing_and_tiny_decays():
    """The float32 kernel's own exp clamps its argument: decays exp(delta A) far below float32's range
    (delta up to 30, A down to -16) and far inside it (delta ~ 1e-6) must both match the float64 truth."""
    u, delta, A, B, C, D = make_inputs(2, 19, 20, 16)
    delta = torch.where(torch.arange(19)[None, :, None] % 2 == 0, 30 * delta, 1e-6 * delta)
    inputs = (u, delta, A, B, C, D)
    truth = selective_scan_reference(*inputs)
    got = selective_scan_compiled(*(t.float() for t in inputs))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), truth, atol=1e-4, rtol=1e-4)


@needs_compiled
@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_float32_keeps_nans_where_the_reference_has_them(reverse):
    """A NaN step size poisons its channel from that token on in scan order, a NaN in A its whole channel,
    as in the reference, and no other channel: the kernel's exp must not clamp a NaN to a finite decay."""
    u, delta, A, B, C, D = (t.float() for t in make_inputs(1, 9, 20, 16))
    delta[0, 4, 3] = float("nan")
    A[7, 5] = float("nan")
    got = selective_scan_compiled(u, delta, A, B, C, D, reverse=reverse)
    truth = selective_scan_reference(u.double(), delta.double(), A.double(), B.double(), C.double(), D.double(),
                                     reverse=reverse)
    assert truth[0, :, 7].isnan().all() and truth.isnan().sum() == 9 + 5
    assert torch.equal(got.isnan(), truth.isnan())


@needs_compiled
@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_gradcheck(reverse):
    inputs = tuple(t.requires_grad_() for t in make_inputs(2, 5, 17, 3))
    assert torch.autograd.gradcheck(functools.partial(selective_scan_compiled, reverse=reverse), inputs)


@needs_compiled
def test_compiled_independent_of_thread_count():
    inputs = make_inputs(3, 33, 37, 16, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(selective_scan_compiled, inputs, False)
        torch.set_num_threads(2)
        two = run_with_grads(selective_scan_compiled, inputs, False)
    finally:
        torch.set_num_threads(threads)
    assert_all_close(two, one, atol=0, rtol=0)


@needs_compiled
def test_compiled_takes_non_contiguous_inputs():
    batch, length, d, n_state = 2, 9, 20, 4
    u, delta, A, B, C, D = make_inputs(batch, length, d, n_state)
    proj = torch.cat((B, C), dim=-1)  # B and C as views into one projection, like the model's split
    views = (u, delta, A.t().contiguous().t(), proj[..., :n_state], proj[..., n_state:], D)
    assert not views[3].is_contiguous() and not views[2].is_contiguous()
    torch.testing.assert_close(selective_scan_compiled(*views), selective_scan_reference(u, delta, A, B, C, D))


@needs_compiled
def test_loading_kernel_keeps_denormals():
    assert cpu_kernels.available()
    tiny = torch.tensor(1e-38) * torch.tensor(1e-3)  # a float32 denormal, flushed to 0 under FTZ
    assert tiny.item() != 0


@needs_compiled
def test_build_uses_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAMERGE_CACHE", str(tmp_path))
    lib = build_library("g++")
    assert lib.parent.parent == tmp_path and lib.exists()
    # temporary build files are gone: the library and the record of its SHA-256 remain
    assert sorted(p.name for p in lib.parent.iterdir()) == ["_cpu_kernels.sha256", lib.name]
    assert build_library("g++") == lib


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_output_equals_grad_output(impl):
    inputs = tuple(t.requires_grad_() for t in make_inputs(3, 33, 37, 16, torch.float32))
    with_grad = selective_scan(*inputs, reverse=True, impl=impl)
    with torch.no_grad():
        without_grad = selective_scan(*inputs, reverse=True, impl=impl)
    assert with_grad.requires_grad and not without_grad.requires_grad
    assert torch.equal(with_grad.detach(), without_grad)


def test_auto_uses_scan_backend():
    expected = "compiled" if cpu_kernels.available() else "loop"
    assert scan_backend("cpu") == scan_backend(torch.device("cpu")) == expected
    assert scan_backend("cuda") in ("mamba_ssm", "triton", "parallel")
    inputs = make_inputs(2, 7, 20, 4)
    torch.testing.assert_close(selective_scan(*inputs), selective_scan_reference(*inputs), atol=1e-10, rtol=1e-10)


def test_auto_falls_back_to_loop_with_one_warning(monkeypatch):
    monkeypatch.setattr(library, "_loaded", library.Loaded(None, None, "no C++ compiler (g++) on PATH"))
    monkeypatch.setattr(ops, "_warned_fallback", False)
    inputs = make_inputs(2, 7, 20, 4)
    assert scan_backend("cpu") == "loop"
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler.*slower"):
        y = selective_scan(*inputs)
    torch.testing.assert_close(y, selective_scan_reference(*inputs), atol=1e-10, rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selective_scan(*inputs)  # warned once only
    with pytest.raises(RuntimeError, match="no C"):
        selective_scan(*inputs, impl="compiled")


def test_unknown_impl_lists_valid_ones():
    with pytest.raises(ValueError, match="compiled, loop, parallel"):
        selective_scan(*make_inputs(1, 2, 3, 4), impl="fast")


def replaced(inputs, name, value):
    return tuple(value if n == name else t for n, t in zip(NAMES, inputs))


@pytest.mark.parametrize(
    "name, shape",
    [("u", (2, 7)), ("delta", (2, 6, 20)), ("A", (20,)), ("A", (19, 4)), ("B", (2, 7, 5)), ("C", (1, 7, 4)), ("D", (4,))],
)
@pytest.mark.parametrize("impl", ["auto", "compiled", "loop", "parallel"])
def test_shape_mismatch_is_a_clear_error(impl, name, shape):
    inputs = replaced(make_inputs(2, 7, 20, 4), name, torch.zeros(shape, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"{name} .*shape"):
        selective_scan(*inputs, impl=impl)


@pytest.mark.parametrize("impl", ["auto", "compiled", "loop", "parallel"])
def test_dtype_mix_is_a_clear_error(impl):
    inputs = make_inputs(2, 7, 20, 4)
    inputs = replaced(inputs, "D", inputs[5].float())
    with pytest.raises(ValueError, match="dtype"):
        selective_scan(*inputs, impl=impl)


def test_compiled_rejects_unsupported_dtype():
    with pytest.raises(ValueError, match="float32 and float64"):
        selective_scan_compiled(*make_inputs(1, 3, 5, 2, torch.bfloat16))


@pytest.mark.parametrize(
    "device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def test_compiled_rejects_non_cpu_tensors(device):
    inputs = tuple(t.to(device) for t in make_inputs(1, 3, 5, 2))
    with pytest.raises(ValueError, match="CPU"):
        selective_scan_compiled(*inputs)


def test_device_mix_is_a_clear_error():
    inputs = replaced(make_inputs(1, 3, 5, 2), "A", torch.zeros(5, 2, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="device"):
        selective_scan(*inputs, impl="loop")


@pytest.mark.skipif(ops._mamba_ssm_fn() is not None, reason="mamba_ssm is installed")
def test_mamba_ssm_impl_without_package_is_a_clear_error():
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        selective_scan(*make_inputs(1, 3, 5, 2), impl="mamba_ssm")


@needs_compiled
def test_compiled_std_thread_path_matches_openmp_team(monkeypatch):
    inputs = make_inputs(3, 33, 37, 16, torch.float32)
    team = run_with_grads(selective_scan_compiled, inputs, True)
    monkeypatch.setattr(library, "_loaded", library.loaded()._replace(launcher=None))
    threads = run_with_grads(selective_scan_compiled, inputs, True)
    assert_all_close(threads, team, atol=0, rtol=0)
