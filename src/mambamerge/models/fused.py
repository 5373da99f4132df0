"""The mixer's channel-major kernel path: causal-conv1d's convolution and mamba_ssm's selective scan
("fused"), or torch's convolution and the Triton scan ("triton"; ops.triton_kernels).

Channel-major, as the kernels take their inputs: (batch, channels, L), last axis contiguous. The scan
kernel adds the step-size bias, applies softplus and gates its output with SiLU(z) itself, so the
step size Δ is never materialised, except in blocks asked for SSMStats: the Triton scan then writes Δ and
its channel mean from the same pass, mamba_ssm's is followed by computing Δ once more outside the kernel
(`reported_stats`); either way the output is the same as without the report. With mamba_ssm's kernels a
backward branch runs on the flipped sequence and its output is flipped back; the Triton path convolves
and scans it backwards in place (FusedKernels.in_order).

Same semantics as MambaMixer's own path: the gate distributes over the sum of the two directions, so
gating each direction inside the kernel and then summing (and halving, where the model divides)
equals summing, gating and halving.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from mambamerge.ops import FusedKernels, softplus, triton_handles
from mambamerge.tokens import SSMStats

KERNEL_DEVICES = ("cuda",)  # tests add "cpu" to run the path against stand-in kernels
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONV_WIDTHS = (2, 3, 4)
MAX_STATE = 256


class Branch(NamedTuple):
    """One convolution + projection branch in scan order: u, dt (batch, d_inner, L), dt before its bias;
    B, C (batch, d_state, L)."""

    u: torch.Tensor
    dt: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor

    def flip(self) -> "Branch":
        return Branch(*(t.flip(-1) for t in self))


def unsupported_reason(mixer, hidden: torch.Tensor, kernels: Optional[FusedKernels] = None) -> Optional[str]:
    """Why the kernels (mamba_ssm's, or the Triton ones when kernels.in_order) cannot run `mixer` on
    `hidden`, or None when they can."""
    if kernels is not None and kernels.in_order:
        for what, t in (("input", hidden), ("weight", mixer.in_proj.weight)):
            if not triton_handles(t):
                return (f"the Triton kernels take float32, float16 or bfloat16 CUDA tensors, the mixer's {what} is "
                        f"{t.dtype} on {t.device}")
        return None
    if hidden.device.type not in KERNEL_DEVICES:
        return f"the kernels run on CUDA tensors, the input is on {hidden.device}"
    if mixer.d_conv not in CONV_WIDTHS:
        return f"causal-conv1d supports convolution widths 2 to 4, this mixer has d_conv={mixer.d_conv}"
    if mixer.d_state > MAX_STATE:
        return f"mamba_ssm's scan supports d_state up to {MAX_STATE}, this mixer has d_state={mixer.d_state}"
    for what, dtype in (("input", hidden.dtype), ("weight", mixer.in_proj.weight.dtype)):
        if dtype not in KERNEL_DTYPES:
            return f"the kernels take float32, float16 or bfloat16, the mixer's {what} is {dtype}"
    return None


def reported_stats(branch: Branch, bias: torch.Tensor, flipped: bool) -> Tuple[torch.Tensor, ...]:
    """One branch's part of SSMStats in sequence order (flipped: the branch ran on the flipped sequence):
    Δ = softplus(dt + bias) as the scan kernel computes it internally (batch, d_inner, L), B (batch,
    d_state, L) and Δ's mean over channels (batch, L), in at least float32 (the scan's own precision)."""
    dtype = torch.promote_types(branch.dt.dtype, torch.float32)
    delta = softplus(branch.dt.to(dtype) + bias.to(dtype)[:, None])
    stats = delta, branch.B.to(dtype), delta.mean(dim=1)
    return tuple(t.flip(-1) for t in stats) if flipped else stats


def _branch(mixer, kernels: FusedKernels, x: torch.Tensor, suffix: str, reverse: bool = False) -> Branch:
    """x (batch, d_inner, L) in scan order (in_order kernels: in sequence order, convolved backwards when
    reverse) -> the branch's scan inputs (see Branch)."""
    conv = getattr(mixer, "conv1d" + suffix)
    direction = {"reverse": reverse} if kernels.in_order else {}
    u = kernels.causal_conv1d_fn(x, conv.weight[:, 0], conv.bias, activation="silu", **direction)
    dt, B, C = torch.matmul(getattr(mixer, "x_proj" + suffix).weight, u).split(
        [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=1)
    return Branch(u, torch.matmul(getattr(mixer, "dt_proj" + suffix).weight, dt), B, C)


def _scan(kernels: FusedKernels, branch: Branch, z: torch.Tensor, a_log: torch.Tensor, skip: torch.Tensor,
          dt_bias: torch.Tensor, reverse: bool, report: bool):
    """One direction with bias + softplus of the step and the SiLU(z) gate inside the kernel: (output
    (batch, d_inner, L), this branch's part of SSMStats (see reported_stats) or None), both in sequence
    order. branch and z (batch, d_inner, L) in scan order, i.e. flipped when reverse, unless in_order."""
    args = (branch.u, branch.dt, -torch.exp(a_log.float()), branch.B, branch.C, skip.float())
    options = dict(z=z, delta_bias=dt_bias.float(), delta_softplus=True)
    if kernels.in_order:
        if not report:
            return kernels.selective_scan_fn(*args, **options, reverse=reverse), None
        y, delta, mean = kernels.selective_scan_fn(*args, **options, reverse=reverse, report=True)
        return y, (delta, branch.B.to(delta.dtype), mean)
    y = kernels.selective_scan_fn(*args, **options)
    stats = reported_stats(branch, dt_bias, flipped=reverse) if report else None
    return (y.flip(-1) if reverse else y), stats


def fused_forward(mixer, hidden: torch.Tensor, kernels: FusedKernels, return_ssm: bool = False):
    """MambaMixer.forward through the kernels. hidden: (batch, L, d_model) -> (batch, L, d_model), plus
    SSMStats when return_ssm."""
    xz = torch.matmul(mixer.in_proj.weight, hidden.transpose(1, 2))  # (batch, 2 d_inner, L)
    x, z = xz.chunk(2, dim=1)
    fwd = _branch(mixer, kernels, x, "")
    y, forward_stats = _scan(kernels, fwd, z, mixer.A_log, mixer.D, mixer.dt_proj.bias, False, return_ssm)
    backward_stats = forward_stats
    if mixer.variant == "bi":
        if kernels.in_order:
            bwd, z_b = _branch(mixer, kernels, x, "_b", reverse=True), z
        else:
            x_b, z_b = xz.flip(-1).chunk(2, dim=1)
            bwd = _branch(mixer, kernels, x_b, "_b")
        y_b, backward_stats = _scan(kernels, bwd, z_b, mixer.A_b_log, mixer.D_b, mixer.dt_proj_b.bias, True,
                                    return_ssm)
        y = y + y_b
    elif mixer.variant == "bi_shared":
        shared, z_b = (fwd, z) if kernels.in_order else (fwd.flip(), z.flip(-1))
        y = y + _scan(kernels, shared, z_b, mixer.A_b_log, mixer.D, mixer.dt_proj.bias, True, False)[0]
    if mixer.divide_out and mixer.scans == 2:
        y = y * 0.5
    out = F.linear(y.transpose(1, 2), mixer.out_proj.weight)
    if not return_ssm:
        return out
    (delta_f, B_f, mean_f), (delta_b, B_b, mean_b) = forward_stats, backward_stats
    return out, SSMStats(delta_f, delta_b, B_f, B_b, mean_f, mean_b)
