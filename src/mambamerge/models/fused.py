"""The mixer's fused CUDA paths: causal-conv1d's convolution and mamba_ssm's selective scan (FusedPath),
or torch's convolution and the Triton scan (TritonPath).

Channel-major, as the kernels take their inputs: (batch, channels, L), last axis contiguous. The scan
kernel adds the step-size bias, applies softplus and gates its output with SiLU(z) itself, so the
step size Δ is never materialised, except in blocks asked for SSMStats, which compute it once more
outside the kernel to report it (`reported_stats`); their output is the same as without the report.
A backward branch runs both kernels on the flipped sequence and its output is flipped back. The Triton
kernels take the direction as an argument instead, so that path flips nothing, and they report Δ and its
channel mean from the scan itself.

Same semantics as the PyTorch path: the gate distributes over the sum of the two directions, so
gating each direction inside the kernel and then summing (and halving, where the model divides)
equals summing, gating and halving.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from mambamerge.ops import FusedKernels, softplus, triton_handles

KERNEL_DEVICES = ("cuda",)  # tests add "cpu" to run the path against stand-in kernels
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONV_WIDTHS = (2, 3, 4)
MAX_STATE = 256


class KernelInputs(NamedTuple):
    """One convolution + projection branch in scan order: u, dt (batch, d_inner, L), dt before its bias;
    B, C (batch, d_state, L)."""

    u: torch.Tensor
    dt: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor

    def flip(self) -> "KernelInputs":
        return KernelInputs(*(t.flip(-1) for t in self))


def unsupported_reason(mixer, hidden: torch.Tensor) -> Optional[str]:
    """Why the kernels cannot run `mixer` on `hidden`, or None when they can."""
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


def triton_unsupported_reason(mixer, hidden: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run `mixer` on `hidden`, or None when they can."""
    for what, t in (("input", hidden), ("weight", mixer.in_proj.weight)):
        if not triton_handles(t):
            return (f"the Triton kernels take float32, float16 or bfloat16 CUDA tensors, the mixer's {what} is "
                    f"{t.dtype} on {t.device}")
    return None


def reported_stats(branch: KernelInputs, bias: torch.Tensor, flipped: bool) -> Tuple[torch.Tensor, ...]:
    """One branch's part of SSMStats in sequence order (flipped: the branch ran on the flipped sequence):
    Δ = softplus(dt + bias) as the scan kernel computes it internally (batch, d_inner, L), B (batch,
    d_state, L) and Δ's mean over channels (batch, L), in at least float32 (the scan's own precision)."""
    dtype = torch.promote_types(branch.dt.dtype, torch.float32)
    delta = softplus(branch.dt.to(dtype) + bias.to(dtype)[:, None])
    stats = delta, branch.B.to(dtype), delta.mean(dim=1)
    return tuple(t.flip(-1) for t in stats) if flipped else stats


class FusedPath:
    """The mixer's steps (as TorchPath's, models/mixer.py) through the kernels, channel-major."""

    def __init__(self, mixer, kernels: FusedKernels):
        self.mixer = mixer
        self.kernels = kernels

    def project(self, hidden: torch.Tensor):
        """hidden (batch, L, d_model) -> x, z (batch, d_inner, L)."""
        return torch.matmul(self.mixer.in_proj.weight, hidden.transpose(1, 2)).chunk(2, dim=1)

    def branch(self, x: torch.Tensor, branch, mean_delta: bool) -> KernelInputs:
        """x (batch, d_inner, L) -> the branch's scan inputs in its convolution's order (flipped for a
        backward branch); the kernel computes Δ, so mean_delta is left to `stats`."""
        mixer = self.mixer
        conv = getattr(mixer, "conv1d" + branch.suffix)
        u = self.kernels.causal_conv1d_fn(x.flip(-1) if branch.reverse else x, conv.weight[:, 0], conv.bias,
                                          activation="silu")
        dt, B, C = torch.matmul(getattr(mixer, "x_proj" + branch.suffix).weight, u).split(
            [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=1)
        return KernelInputs(u, torch.matmul(getattr(mixer, "dt_proj" + branch.suffix).weight, dt), B, C)

    def scan(self, inputs: KernelInputs, branch, scan, z: torch.Tensor) -> torch.Tensor:
        """One direction with bias + softplus of the step and the SiLU(z) gate inside the kernel, run in scan
        order: (batch, d_inner, L) in sequence order."""
        mixer = self.mixer
        if branch.reverse != scan.reverse:
            inputs = inputs.flip()
        y = self.kernels.selective_scan_fn(
            inputs.u, inputs.dt, -torch.exp(getattr(mixer, scan.a_log).float()), inputs.B, inputs.C,
            getattr(mixer, "D" + branch.suffix).float(), z=z.flip(-1) if scan.reverse else z,
            delta_bias=getattr(mixer, "dt_proj" + branch.suffix).bias.float(), delta_softplus=True)
        return y.flip(-1) if scan.reverse else y

    def output(self, parts, z: torch.Tensor, halve: bool) -> torch.Tensor:
        """The summed (already gated) scans, halved when asked, through out_proj: (batch, L, d_model)."""
        y = sum(parts[1:], parts[0])
        return F.linear((y * 0.5 if halve else y).transpose(1, 2), self.mixer.out_proj.weight)

    def stats(self, inputs: KernelInputs, branch):
        return reported_stats(inputs, getattr(self.mixer, "dt_proj" + branch.suffix).bias, flipped=branch.reverse)


class TritonInputs(NamedTuple):
    """A branch's scan inputs in sequence order (as KernelInputs), and `reported`: the list its first scan
    fills with (Δ, mean Δ) when the block was asked for SSMStats (report), else left empty."""

    u: torch.Tensor
    dt: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    report: bool
    reported: list


class TritonPath(FusedPath):
    """FusedPath's steps through torch's convolution and the Triton scan (ops.triton_kernels): a backward
    branch convolves and scans backwards in place, and Δ for SSMStats comes from the scan's own pass."""

    def branch(self, x: torch.Tensor, branch, mean_delta: bool) -> TritonInputs:
        mixer = self.mixer
        conv = getattr(mixer, "conv1d" + branch.suffix)
        u = self.kernels.causal_conv1d_fn(x, conv.weight[:, 0], conv.bias, activation="silu", reverse=branch.reverse)
        dt, B, C = torch.matmul(getattr(mixer, "x_proj" + branch.suffix).weight, u).split(
            [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=1)
        return TritonInputs(u, torch.matmul(getattr(mixer, "dt_proj" + branch.suffix).weight, dt), B, C,
                            mean_delta, [])

    def scan(self, inputs: TritonInputs, branch, scan, z: torch.Tensor) -> torch.Tensor:
        mixer = self.mixer
        report = inputs.report and not inputs.reported
        out = self.kernels.selective_scan_fn(
            inputs.u, inputs.dt, -torch.exp(getattr(mixer, scan.a_log).float()), inputs.B, inputs.C,
            getattr(mixer, "D" + branch.suffix).float(), z=z,
            delta_bias=getattr(mixer, "dt_proj" + branch.suffix).bias.float(), delta_softplus=True,
            reverse=scan.reverse, report=report)
        if not report:
            return out
        inputs.reported.extend(out[1:])
        return out[0]

    def stats(self, inputs: TritonInputs, branch):
        delta, mean = inputs.reported
        return delta, inputs.B.to(delta.dtype), mean
