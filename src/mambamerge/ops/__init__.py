"""Selective scan: one entry point over several implementations.

Layouts are sequence-major with channels last: u, delta (batch, L, d); A (d, N);
B, C (batch, L, N); D (d,). Softplus, bias and the SiLU(z) gate belong to the
caller. ``reverse=True`` scans from the last token to the first, output in
sequence order.

Implementations ("impl"):
    compiled   C++ kernel for CPU float32/float64 (needs g++, Linux x86_64; ops/cpu_kernels/)
    loop       pure-PyTorch fused loop over time, hand-written backward
    parallel   pure-PyTorch log-depth associative scan (GPU friendly)
    reference  plain Python loop, the ground truth (slow)
    mamba_ssm  the CUDA kernel of the mamba_ssm package, if installed
    triton     Triton kernels (triton_scan.py), compiled at run time: CUDA float32/bfloat16/float16
    auto       CUDA: mamba_ssm if importable, else triton if importable, else parallel;
               CPU: compiled if available, else loop (warns once)

The mixer (models/mixer.py) also takes MIXER_IMPLS' "fused": convolution, scan, step-size bias and
softplus and the SiLU(z) gate in the kernels of causal-conv1d and mamba_ssm (models/fused.py); its
"triton" runs the same channel-major path with torch's convolution and the Triton scan, which adds the
bias, applies softplus and the gate itself, scans backwards without flipping and reports Δ from the same
pass (models/fused.TritonPath); its "auto" picks "fused" on CUDA when both packages import
(fused_kernels()), else "triton" when Triton imports (triton_kernels()), and on CPU runs float32
inference as one whole-mixer kernel call per block (cpu_kernels.mixer_forward).
"""
import functools
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from mambamerge.ops import cpu_kernels
from mambamerge.ops.checks import check_inputs
from mambamerge.ops.cpu_kernels import selective_scan as selective_scan_compiled
from mambamerge.ops.loop import selective_scan_loop
from mambamerge.ops.parallel import selective_scan_parallel
from mambamerge.ops.reference import selective_scan_reference

__all__ = [
    "IMPLS",
    "MIXER_IMPLS",
    "FusedKernels",
    "fused_kernels",
    "mixer_backend",
    "triton_handles",
    "triton_kernels",
    "scan_backend",
    "selective_scan",
    "selective_scan_compiled",
    "selective_scan_loop",
    "selective_scan_mamba_ssm",
    "selective_scan_parallel",
    "selective_scan_reference",
    "selective_scan_triton",
    "softplus",
    "softplus_with_row_mean",
]

IMPLS = ("auto", "compiled", "loop", "parallel", "reference", "mamba_ssm", "triton")
MIXER_IMPLS = IMPLS + ("fused",)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned_fallback = False


@functools.lru_cache(maxsize=None)
def _mamba_ssm_fn():
    """mamba_ssm's selective_scan_fn, or None when it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=None)
def _causal_conv1d_fn():
    """causal-conv1d's causal_conv1d_fn, or None when it cannot be imported."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError):
        return None
    return causal_conv1d_fn


@functools.lru_cache(maxsize=None)
def _triton_scan():
    """The triton_scan module, or None when Triton cannot be imported."""
    try:
        from mambamerge.ops import triton_scan
    except (ImportError, OSError, RuntimeError):
        return None
    return triton_scan


class FusedKernels(NamedTuple):
    """The two kernels of a channel-major mixer path, with causal-conv1d's and mamba_ssm's signatures
    (triton_kernels' also take reverse=, and the scan report=)."""

    causal_conv1d_fn: Callable
    selective_scan_fn: Callable


def fused_kernels() -> Optional[FusedKernels]:
    """causal-conv1d's and mamba_ssm's kernels when both packages import, else None."""
    conv_fn, scan_fn = _causal_conv1d_fn(), _mamba_ssm_fn()
    if conv_fn is None or scan_fn is None:
        return None
    return FusedKernels(conv_fn, scan_fn)


def depthwise_causal_conv1d(x, weight, bias=None, activation=None, reverse=False):
    """causal-conv1d's causal_conv1d_fn in torch: x (batch, d, L), weight (d, K), bias (d,) -> (batch, d,
    L), out_t = bias + sum_k w[k] x[t - (K-1) + k] (reverse: x[t + (K-1) - k]), then SiLU if asked."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    k_size, length = weight.shape[-1], x.shape[-1]
    w = weight.flip(-1) if reverse else weight
    out = F.conv1d(x, w[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype), padding=k_size - 1,
                   groups=x.shape[1])
    out = out[..., k_size - 1:] if reverse else out[..., :length]
    return F.silu(out) if activation is not None else out


def triton_kernels() -> Optional[FusedKernels]:
    """torch's convolution and the Triton scan for the mixer path when Triton imports, else None."""
    module = _triton_scan()
    if module is None:
        return None
    return FusedKernels(depthwise_causal_conv1d, module.selective_scan_triton)


def triton_handles(t: torch.Tensor) -> bool:
    """True if the Triton kernels import and run on t (CUDA, or CPU under TRITON_INTERPRET=1) in its dtype."""
    module = _triton_scan()
    return module is not None and t.dtype in TRITON_DTYPES and module.handles(t.device)


def selective_scan_triton(u, delta, A, B, C, D, reverse=False):
    """Selective scan with the Triton kernels (shapes as selective_scan): the (batch, L, k) inputs pass
    as (batch, k, L) views, without copies."""
    module = _triton_scan()
    if module is None:
        raise RuntimeError("impl='triton' needs the triton package, which cannot be imported")
    y = module.selective_scan_triton(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                     C.transpose(1, 2), D, reverse=reverse)
    return y.transpose(1, 2)


def selective_scan_mamba_ssm(u, delta, A, B, C, D, reverse=False):
    """Selective scan with mamba_ssm's CUDA kernel (shapes as selective_scan).

    The kernel takes (batch, d, L) and (batch, N, L) layouts and only scans
    forward; reverse flips the sequence around it.
    """
    scan_fn = _mamba_ssm_fn()
    if scan_fn is None:
        raise RuntimeError("impl='mamba_ssm' needs the mamba_ssm package, which cannot be imported")

    def to_kernel(x):  # (batch, L, k) -> (batch, k, L), in scan order
        x = x.transpose(1, 2)
        return x.flip(-1) if reverse else x

    y = scan_fn(to_kernel(u), to_kernel(delta), A, to_kernel(B), to_kernel(C), D)
    return (y.flip(-1) if reverse else y).transpose(1, 2)


def scan_backend(device) -> str:
    """The implementation impl="auto" uses for tensors on device."""
    device = torch.device(device)
    if device.type == "cpu":
        return "compiled" if cpu_kernels.available() else "loop"
    if device.type == "cuda" and _mamba_ssm_fn() is not None:
        return "mamba_ssm"
    if device.type == "cuda" and _triton_scan() is not None:
        return "triton"
    return "parallel"


def mixer_backend(device) -> str:
    """What a mixer with scan_impl="auto" runs for tensors on device: on CUDA "fused" when both kernel
    packages import, else "triton" when Triton does (for the mixers and dtypes the kernels support), else
    its scan's scan_backend."""
    if torch.device(device).type == "cuda" and fused_kernels() is not None:
        return "fused"
    if torch.device(device).type == "cuda" and _triton_scan() is not None:
        return "triton"
    return scan_backend(device)


def _auto_impl(u):
    global _warned_fallback
    impl = scan_backend(u.device)
    if impl == "compiled" and u.dtype not in (torch.float32, torch.float64):
        return "loop"
    if impl == "triton" and u.dtype not in TRITON_DTYPES:
        return "parallel"
    if impl == "loop" and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"compiled CPU selective scan unavailable ({cpu_kernels.unavailable_reason()}); "
            "using the pure-PyTorch loop, which is several times slower",
            RuntimeWarning,
            stacklevel=3,
        )
    return impl


_IMPL_FNS = {
    "compiled": selective_scan_compiled,
    "loop": selective_scan_loop,
    "parallel": selective_scan_parallel,
    "reference": selective_scan_reference,
    "mamba_ssm": selective_scan_mamba_ssm,
    "triton": selective_scan_triton,
}


def selective_scan(u, delta, A, B, C, D, reverse=False, impl="auto"):
    """Selective scan h_t = exp(delta_t A) h_prev + delta_t B_t u_t, y_t = <h_t, C_t> + D u_t.

    Args:
        u, delta: (batch, L, d); A: (d, N); B, C: (batch, L, N); D: (d,), one
            floating dtype and device.
        reverse: scan from the last token to the first (output in sequence order).
        impl: one of IMPLS (see the module docstring).

    Returns:
        y: (batch, L, d).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown selective scan impl {impl!r}; valid: {', '.join(IMPLS)}")
    check_inputs(u, delta, A, B, C, D)
    if impl == "auto":
        impl = _auto_impl(u)
    return _IMPL_FNS[impl](u, delta, A, B, C, D, reverse=reverse)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """The step-size activation log(1 + exp(x)): the compiled kernel for CPU float32/float64 tensors when
    it is available (torch's CPU softplus is the slowest op of a Vim forward), torch's otherwise."""
    return cpu_kernels.softplus(x) if cpu_kernels.handles(x) else F.softplus(x)


def softplus_with_row_mean(x: torch.Tensor):
    """(softplus(x), its mean over the last dimension). (..., d) -> (..., d), (...). One pass of the
    compiled kernel where no gradient is needed (the mean comes free while the row is in cache);
    differentiable torch operations otherwise."""
    if cpu_kernels.handles(x) and not (torch.is_grad_enabled() and x.requires_grad):
        return cpu_kernels.softplus_with_row_mean(x)
    y = softplus(x)
    return y, y.mean(dim=-1)
