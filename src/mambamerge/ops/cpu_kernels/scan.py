"""The selective scan kernel and its backward as custom operators (shapes as mambamerge.ops.selective_scan)."""
from typing import List

import torch

from mambamerge.ops.checks import check_inputs
from mambamerge.ops.cpu_kernels.library import SUFFIX, available, call, unavailable_reason
from mambamerge.ops.cpu_kernels.registration import dispatch, register

_BLOCK = 16  # channels per task, kBlock in kernels.cpp


def _ptrs(*tensors):
    return [t.data_ptr() for t in tensors]


def _forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor, reverse: bool) -> torch.Tensor:
    u, delta, B, C, D = (t.contiguous() for t in (u, delta, B, C, D))
    At = A.t().contiguous()  # (N, d); every tensor passed by address stays referenced until the call returns
    y = u.new_empty(u.shape)
    status = call("mm_scan_forward", u.dtype, *_ptrs(u, delta, At, B, C, D, y), *u.shape, A.shape[1], int(reverse))
    if status != 0:
        raise MemoryError("selective scan kernel (forward) failed to allocate its buffers")
    return y


def _backward_impl(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, dy: torch.Tensor, reverse: bool) -> List[torch.Tensor]:
    """Gradients of the scan for all six inputs, each shaped and laid out as a contiguous copy of its input."""
    u, delta, B, C, D, dy = (t.contiguous() for t in (u, delta, B, C, D, dy))
    At = A.t().contiguous()
    batch, length, d = u.shape
    n_state = A.shape[1]
    n_blocks = -(-d // _BLOCK)
    du, ddelta = u.new_empty(u.shape), u.new_empty(u.shape)
    # per-task partial sums, reduced below
    dA = u.new_empty(batch, d, n_state)
    dB = u.new_empty(batch, n_blocks, length, n_state)
    dC = u.new_empty(batch, n_blocks, length, n_state)
    dD = u.new_empty(batch, d)
    status = call("mm_scan_backward", u.dtype, *_ptrs(u, delta, At, B, C, D, dy, du, ddelta, dA, dB, dC, dD),
                  batch, length, d, n_state, int(reverse))
    if status != 0:
        raise MemoryError("selective scan kernel (backward) failed to allocate its buffers")
    return [du, ddelta, dA.sum(0), dB.sum(1), dC.sum(1), dD.sum(0)]


_BACKWARD = register("selective_scan_backward", _backward_impl,
                     lambda u, delta, A, B, C, D, dy, reverse: [t.new_empty(t.shape) for t in (u, delta, A, B, C, D)])


def _setup_context(ctx, inputs, output):
    *tensors, reverse = inputs
    ctx.reverse = reverse
    ctx.save_for_backward(*tensors)


def _backward(ctx, dy):
    return (*_BACKWARD(*ctx.saved_tensors, dy, ctx.reverse), None)


_SCAN = register("selective_scan", _forward, lambda u, delta, A, B, C, D, reverse: u.new_empty(u.shape),
                 backward=_backward, setup_context=_setup_context)


def selective_scan(u, delta, A, B, C, D, reverse=False):
    """Selective scan with the CPU kernel (torch.ops.mambamerge.selective_scan); differentiable in all six
    inputs (once: the backward is itself a kernel without a backward).

    Args:
        u, delta: (batch, L, d); A: (d, N); B, C: (batch, L, N); D: (d,). CPU
            tensors, all float32 or all float64.
        reverse: scan from the last token to the first.

    Returns:
        y: (batch, L, d), as selective_scan_reference.
    """
    check_inputs(u, delta, A, B, C, D)
    if u.device.type != "cpu":
        raise ValueError(f"compiled selective scan runs on CPU tensors only, got {u.device}")
    if u.dtype not in SUFFIX:
        raise ValueError(f"compiled selective scan supports float32 and float64, got {u.dtype}")
    if not available():
        raise RuntimeError(f"compiled selective scan unavailable: {unavailable_reason()}")
    args = (u, delta, A, B, C, D, bool(reverse))
    return dispatch(_SCAN, _forward, args, differentiable=args[:6])
