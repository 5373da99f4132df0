"""The convolution + SiLU and the gate kernels against torch's path (the independent reference): values,
both directions, strided inputs, batch invariance, and the mixer choosing them only where no gradient is
needed."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mambamerge
from mambamerge.models.mixer import depthwise_conv_along_sequence
from mambamerge.ops import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")


def torch_path(x, weight, bias, reverse):
    return F.silu(depthwise_conv_along_sequence(x, weight, bias, reverse))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 12), channels=st.integers(1, 40), k_size=st.integers(1, 5),
       reverse=st.booleans(), strided=st.booleans(), double=st.booleans(), seed=st.integers(0, 10_000))
def test_kernel_matches_torch(batch, length, channels, k_size, reverse, strided, double, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    wide = torch.randn(batch, length, 2 * channels if strided else channels, generator=gen, dtype=dtype) * 3
    x = wide[..., :channels]  # as in_proj's x half: rows 2 * channels apart
    weight = torch.randn(channels, 1, k_size, generator=gen, dtype=dtype)
    bias = torch.randn(channels, generator=gen, dtype=dtype)
    got = cpu_kernels.conv_silu(x, weight, bias, reverse)
    assert got.is_contiguous()
    tol = dict(rtol=1e-12, atol=1e-12) if double else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got, torch_path(x, weight, bias, reverse), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_row_does_not_depend_on_its_batch(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 13, 2 * 37, generator=gen, dtype=dtype)[..., :37]
    weight, bias = torch.randn(37, 1, 4, generator=gen, dtype=dtype), torch.randn(37, generator=gen, dtype=dtype)
    y = torch.randn(7, 13, 37, generator=gen, dtype=dtype)
    together = cpu_kernels.conv_silu(x, weight, bias, False)
    gated = cpu_kernels.gate(y, together, x, True)
    for b in range(7):
        assert torch.equal(cpu_kernels.conv_silu(x[b:b + 1], weight, bias, False)[0], together[b])
        assert torch.equal(cpu_kernels.gate(y[b:b + 1], together[b:b + 1], x[b:b + 1], True)[0], gated[b])


def test_the_mixer_uses_the_kernels_in_inference_and_torch_under_autograd(monkeypatch):
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_nano", img_size=32, depth=2, num_classes=3).eval()
    model.set_scan_impl("compiled")  # the per-step kernels ("auto": the whole-mixer kernel, test_mixer_kernel.py)
    x = torch.randn(2, *model.input_shape)
    calls = []
    for name in ("conv_silu", "gate"):
        monkeypatch.setattr(cpu_kernels, name, lambda *a, kernel=getattr(cpu_kernels, name), name=name:
                            calls.append(name) or kernel(*a))
    with torch.no_grad():
        fast = model(x)
    assert sorted(calls) == ["conv_silu"] * 4 + ["gate"] * 2  # two blocks of two directions
    calls.clear()
    slow = model(x)  # gradients recorded: the differentiable torch path
    assert not calls and slow.requires_grad
    slow.sum().backward()
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 9), channels=st.integers(1, 40), two=st.booleans(),
       halve=st.booleans(), double=st.booleans(), seed=st.integers(0, 10_000))
def test_gate_matches_torch(batch, length, channels, two, halve, double, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    y, y2 = (torch.randn(batch, length, channels, generator=gen, dtype=dtype) for _ in range(2))
    z = (torch.randn(batch, length, 2 * channels, generator=gen, dtype=dtype) * 4)[..., channels:]  # in_proj's z half
    want = (y + y2 if two else y) * F.silu(z) * (0.5 if halve else 1.0)
    tol = dict(rtol=1e-12, atol=1e-12) if double else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(cpu_kernels.gate(y, y2 if two else None, z, halve), want, **tol)
