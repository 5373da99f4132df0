"""The step-size softplus: the compiled CPU kernel against a float64 formulation of log(1 + e^x)."""
import pytest
import torch
import torch.nn.functional as F

import mambamerge.ops as ops
from mambamerge.ops import cpu_kernels

needs_compiled = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")


def truth(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) in float64, stable on both sides (torch's own returns x itself above 20)."""
    x = x.double()
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


@needs_compiled
@pytest.mark.parametrize("dtype,low,high,tol", [(torch.float32, -20, 20, 2e-6), (torch.float32, -80, 80, 5e-6),
                                                (torch.float64, -700, 700, 1e-14)])
def test_compiled_relative_error(dtype, low, high, tol):
    x = torch.linspace(low, high, 100_003, dtype=dtype)
    got = cpu_kernels.softplus(x)
    assert got.dtype == dtype
    rel = (got.double() - truth(x)).abs() / truth(x)
    assert rel.max() < tol


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_special_values(dtype):
    got = cpu_kernels.softplus(torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0], dtype=dtype))
    assert got[0] == float("inf") and 0 <= got[1] < 1e-37 and got[2].isnan()
    assert got[3].item() == pytest.approx(0.6931471805599453, rel=1e-7)


@needs_compiled
def test_compiled_shapes_threads_and_layouts():
    """Any shape, non-contiguous input, several tasks per thread: the same values as one thread."""
    x = torch.randn(7, 50_001, dtype=torch.float64).t()[:, 1:]  # non-contiguous, not a multiple of a chunk
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.softplus(x)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == x.shape
    assert torch.equal(cpu_kernels.softplus(x), one)
    torch.testing.assert_close(one, truth(x), rtol=1e-14, atol=0)


@needs_compiled
def test_compiled_gradient():
    x = (torch.randn(64, dtype=torch.float64) * 10).requires_grad_()
    assert torch.autograd.gradcheck(cpu_kernels.softplus, (x,))


def test_dispatch():
    """ops.softplus: the kernel where it applies, torch's softplus elsewhere (other dtypes, no kernel)."""
    half = torch.randn(100).to(torch.bfloat16)
    assert torch.equal(ops.softplus(half), F.softplus(half))
    x = torch.randn(100)
    torch.testing.assert_close(ops.softplus(x), F.softplus(x), rtol=1e-6, atol=0)


def test_compiled_rejects_unsupported_dtype():
    with pytest.raises(ValueError, match="float32/float64"):
        cpu_kernels.softplus(torch.zeros(3, dtype=torch.float16))
