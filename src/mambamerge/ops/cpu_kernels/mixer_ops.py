"""The mixer's elementwise work around the scan as kernel passes: the depthwise causal convolution with
its SiLU, and the gated output. Custom operators without autograd (the torch path serves training)."""
from typing import Optional

import torch

from mambamerge.dtypes import cast
from mambamerge.ops.cpu_kernels.library import address, call
from mambamerge.ops.cpu_kernels.registration import dispatch, register


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(batch, L, d) t as the kernels read it: rows of d contiguous values, evenly strided over batch and
    L (in_proj's x or z half as it is), else a contiguous copy."""
    if t.stride(-1) != 1 or (t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1)):
        return t.contiguous()
    return t


def _conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, reverse: bool) -> torch.Tensor:
    batch, length, channels = x.shape
    x = _rows(x)
    w = cast(weight[:, 0, :].t(), x.dtype).contiguous()  # (K, d): a tap's weights side by side
    b = cast(bias, x.dtype).contiguous()
    y = x.new_empty((batch, length, channels))
    if y.numel() == 0:
        return y
    status = call("mm_conv_silu", x.dtype, x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), batch, length,
                  channels, x.stride(1), w.shape[0], int(reverse))
    if status != 0:
        raise MemoryError("convolution kernel failed: a worker thread could not run")
    return y


_CONV_SILU = register("conv_silu", _conv_silu, lambda x, weight, bias, reverse: x.new_empty(x.shape))


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, reverse: bool) -> torch.Tensor:
    """silu(depthwise causal conv of x along L), out_t = bias + sum_k w[k] x[t - (K-1) + k] (reverse:
    x[t + (K-1) - k]), zeros outside. x: (batch, L, d) CPU float32/float64 (in_proj's x half is read
    in place, no copy); weight: (d, 1, K) as stored by nn.Conv1d; bias: (d,). Returns (batch, L, d)
    contiguous. 4-6x faster than torch's four strided multiply-adds and SiLU on a Vim-Ti block."""
    return dispatch(_CONV_SILU, _conv_silu, (x, weight, bias, reverse))


def _gate(y: torch.Tensor, y2: Optional[torch.Tensor], z: torch.Tensor, halve: bool) -> torch.Tensor:
    y = y.contiguous()
    y2 = None if y2 is None else y2.contiguous()
    z = _rows(z)
    out = y.new_empty(y.shape)
    if out.numel() == 0:
        return out
    status = call("mm_gate", y.dtype, y.data_ptr(), address(y2), z.data_ptr(),
                  out.data_ptr(), y.shape[0] * y.shape[1], y.shape[2], z.stride(1), int(halve))
    if status != 0:
        raise MemoryError("gate kernel failed: a worker thread could not run")
    return out


_GATE = register("gate", _gate, lambda y, y2, z, halve: y.new_empty(y.shape))


def gate(y: torch.Tensor, y2: Optional[torch.Tensor], z: torch.Tensor, halve: bool) -> torch.Tensor:
    """The mixer's gated output (y + y2) * silu(z), times 0.5 when halve, in one pass (y2 None: y alone).
    y, y2, z: (batch, L, d) CPU tensors of one float dtype (in_proj's z half is read in place). Without
    autograd, as conv_silu."""
    return dispatch(_GATE, _gate, (y, y2, z, halve))
