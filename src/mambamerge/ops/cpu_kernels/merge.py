"""The token-merge kernels as custom operators: planning a step from the tokens that leave, and applying
it to the two streams and the token sizes (mambamerge.merge.plan documents the plan)."""
from typing import Optional, Tuple

import torch

from mambamerge.dtypes import cast
from mambamerge.ops.cpu_kernels.library import address, available, call, handles
from mambamerge.ops.cpu_kernels.registration import dispatch, register


def _apply(hidden: torch.Tensor, residual: Optional[torch.Tensor], size: torch.Tensor, rep: torch.Tensor,
           assign: torch.Tensor, movers: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
           mean: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, length, channels = hidden.shape
    new_length, m = rep.shape[1], movers.shape[1]
    out = hidden.new_empty(batch, new_length, channels)
    size_out = size.new_empty(batch, new_length)
    streams = [None if t is None else t.contiguous() for t in (residual, hidden)]
    index = [t.contiguous() for t in (rep, assign, movers, targets)]
    weight = cast(weight, hidden.dtype).contiguous()
    size = size.contiguous()
    status = call("mm_merge_apply", hidden.dtype, *(address(t) for t in streams),
                  *(t.data_ptr() for t in (*index, weight, size, out, size_out)), batch, length, new_length, m,
                  channels, int(mean))
    if status != 0:
        raise MemoryError("merge kernel failed to allocate its buffers")
    return out, size_out


def _apply_fake(hidden, residual, size, rep, assign, movers, targets, weight, mean):
    batch, new_length = rep.shape
    return hidden.new_empty(batch, new_length, hidden.shape[2]), size.new_empty(batch, new_length)


def _plan(src: torch.Tensor, dst: Optional[torch.Tensor], length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, r = src.shape
    rep = src.new_empty(batch, length - r)
    assign = src.new_empty(batch, length)
    src = src.contiguous()
    dst = None if dst is None else dst.contiguous()
    status = call("mm_plan_from_selection", None, src.data_ptr(), address(dst),
                  rep.data_ptr(), assign.data_ptr(), batch, length, r)
    if status != 0:
        raise ValueError("plan_from_selection: src must hold distinct tokens of the sequence and dst survivors")
    return rep, assign


def _plan_fake(src, dst, length):
    batch, r = src.shape
    return src.new_empty(batch, length - r), src.new_empty(batch, length)


_APPLY = register("merge_apply", _apply, _apply_fake)
_PLAN = register("plan_from_selection", _plan, _plan_fake)


def can_merge(hidden: torch.Tensor, residual: Optional[torch.Tensor], size: torch.Tensor) -> bool:
    """True when merge_apply takes these: CPU float32/float64 streams of one dtype, float32 sizes, no
    gradient needed (the kernel has no backward), and the library loaded."""
    streams = [t for t in (hidden, residual) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in streams):
        return False
    return all(t.dtype == hidden.dtype for t in streams) and size.dtype == torch.float32 and handles(hidden)


def merge_apply(hidden, residual, size, rep, assign, movers, targets, weight, mean: bool):
    """One token-merge step on the sum of two streams and on the token sizes, without autograd
    (mambamerge.merge.plan.MergePlan documents the arguments): (B, L, C) streams of one dtype, float32
    or float64 (residual may be None), float32 sizes (B, L) -> (B, L', C), (B, L'). Untouched tokens are
    residual + hidden bit for bit."""
    return dispatch(_APPLY, _apply, (hidden, residual, size, rep, assign, movers, targets, weight, mean))


def can_plan(src: torch.Tensor) -> bool:
    """True when plan_from_selection takes the token indices src: on the CPU, with the library loaded."""
    return src.device.type == "cpu" and available()


def plan_from_selection(src, dst, length: int):
    """rep (B, L - r), the survivors in ascending order, and assign (B, L), each token's new index or -1,
    from src (B, r) the tokens that leave and dst (B, r) the survivor each joins (None: dropped); CPU
    int64 tensors."""
    return dispatch(_PLAN, _plan, (src, dst, length))
