"""CPU stand-ins for the CUDA kernels of mamba_ssm and causal-conv1d, to test the fused mixer path
without a GPU.

Each computes the documented semantics independently (mambamerge's reference scan, torch's conv1d)
and enforces the contract the real kernel checks, read from the public sources (mamba_ssm:
ops/selective_scan_interface.py, csrc/selective_scan/selective_scan.cpp; causal-conv1d:
causal_conv1d_interface.py, csrc/causal_conv1d.cpp): shapes, layouts, dtypes, widths, state size.
Only the device check is left out. Where the real Python interface quietly copies an input whose
layout the kernel cannot read, the stand-in makes the copy too and records it in `KernelLog.copies`,
so tests can assert the fused path never pays for one.
"""
import sys
import types
from typing import List

import torch
import torch.nn.functional as F

from mambamerge.ops import selective_scan_reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelLog:
    """What the stand-ins were called with: `calls` (kernel name, keyword flags) and `copies` (kernel name,
    argument name) for each input the real interface would have made contiguous."""

    def __init__(self):
        self.calls: List[tuple] = []
        self.copies: List[tuple] = []

    def count(self, name: str) -> int:
        return sum(1 for call in self.calls if call[0] == name)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(message)


def _check_shape(t: torch.Tensor, shape, name: str) -> None:
    _require(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def make_selective_scan_fn(log: KernelLog):
    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        """u, delta, z: (batch, dim, L); A: (dim, N) float32; B, C: (batch, N, L); D, delta_bias: (dim,)
        float32. Returns y * SiLU(z) (or y), (batch, dim, L) in u's dtype."""
        _require(not return_last_state, "stand-in: return_last_state is not implemented")
        named = dict(u=u, delta=delta, B=B, C=C, z=z)
        for name, t in named.items():  # the interface's own fix-up
            if t is not None and t.stride(-1) != 1:
                log.copies.append(("selective_scan_fn", name))
                named[name] = t.contiguous()
        u, delta, B, C, z = named.values()
        _require(u.dim() == 3, f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
        batch, dim, length = u.shape
        _require(u.dtype in KERNEL_DTYPES, f"u must be float32, float16 or bfloat16, got {u.dtype}")
        _require(A.dtype == torch.float32, f"A must be float32, got {A.dtype}")
        _require(A.dim() == 2 and A.shape[0] == dim, f"A must be (dim, N), got {tuple(A.shape)}")
        n_state = A.shape[1]
        _require(n_state <= 256, "selective_scan only supports state dimension <= 256")
        _check_shape(delta, (batch, dim, length), "delta")
        _require(delta.dtype == u.dtype, f"delta must have u's dtype {u.dtype}, got {delta.dtype}")
        for name, t in (("B", B), ("C", C)):
            _require(t.dim() == 3, f"stand-in: only input-dependent {name} (batch, N, L) is implemented")
            _check_shape(t, (batch, n_state, length), name)
            _require(t.dtype == u.dtype, f"an input-dependent {name} must have u's dtype {u.dtype}, got {t.dtype}")
        for name, t in (("D", D), ("delta_bias", delta_bias)):
            if t is not None:
                _require(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
                _check_shape(t, (dim,), name)
        if z is not None:
            _check_shape(z, (batch, dim, length), "z")
            _require(z.dtype == u.dtype, f"z must have u's dtype {u.dtype}, got {z.dtype}")
        log.calls.append(("selective_scan_fn", dict(delta_softplus=delta_softplus, delta_bias=delta_bias is not None,
                                                    z=z is not None)))

        step = delta.float()
        if delta_bias is not None:
            step = step + delta_bias[:, None]
        if delta_softplus:
            step = F.softplus(step)
        skip = D if D is not None else u.new_zeros(dim, dtype=torch.float32)
        y = selective_scan_reference(u.float().mT, step.mT, A, B.float().mT, C.float().mT, skip).mT
        if z is not None:
            y = y * F.silu(z.float())
        return y.to(u.dtype)

    return selective_scan_fn


def make_causal_conv1d_fn(log: KernelLog):
    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        """x: (batch, dim, L); weight: (dim, width), width 2..4; bias: (dim,) in weight's dtype. Causal
        depthwise convolution along L, then the activation; (batch, dim, L) in x's dtype."""
        if activation not in (None, "silu", "swish"):
            raise NotImplementedError("activation must be None, silu, or swish")
        _require(seq_idx is None and initial_states is None and not return_final_states
                 and final_states_out is None, "stand-in: sequence indices and states are not implemented")
        _require(x.dim() == 3, f"x must be (batch, dim, L), got shape {tuple(x.shape)}")
        if x.stride(2) != 1 and x.stride(1) != 1:  # the interface's own fix-up
            log.copies.append(("causal_conv1d_fn", "x"))
            x = x.contiguous()
        batch, dim, length = x.shape
        channel_last = x.stride(1) == 1 and x.stride(2) > 1
        if channel_last:
            _require(dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
            _require(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
                     "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) "
                     "to be multiples of 8")
        _require(x.dtype in KERNEL_DTYPES, f"x must be float32, float16 or bfloat16, got {x.dtype}")
        _require(weight.dtype in KERNEL_DTYPES, f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
        _require(weight.dim() == 2 and weight.shape[0] == dim,
                 f"weight must be (dim, width), got {tuple(weight.shape)}")
        width = weight.shape[1]
        _require(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
        if bias is not None:
            _check_shape(bias, (dim,), "bias")
            _require(bias.dtype == weight.dtype, f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
        log.calls.append(("causal_conv1d_fn", dict(activation=activation, channel_last=channel_last)))

        out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., :length]
        if activation is not None:
            out = F.silu(out)
        return out.to(x.dtype)

    return causal_conv1d_fn


def install(monkeypatch) -> KernelLog:
    """Put stand-in `mamba_ssm.ops.selective_scan_interface` and `causal_conv1d` modules into sys.modules
    (undone by monkeypatch) and return the log their functions write to. Callers clear mambamerge.ops'
    cached imports before and after."""
    log = KernelLog()
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = make_selective_scan_fn(log)
    conv = types.ModuleType("causal_conv1d")
    conv.causal_conv1d_fn = make_causal_conv1d_fn(log)
    package, ops = types.ModuleType("mamba_ssm"), types.ModuleType("mamba_ssm.ops")
    package.ops, ops.selective_scan_interface = ops, interface
    for name, module in (("mamba_ssm", package), ("mamba_ssm.ops", ops),
                         ("mamba_ssm.ops.selective_scan_interface", interface), ("causal_conv1d", conv)):
        monkeypatch.setitem(sys.modules, name, module)
    return log
