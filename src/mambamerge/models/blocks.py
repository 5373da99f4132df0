"""The residual block and the Mamba mixer shared by all model families.

Everything runs sequence-major, channels last: (batch, L, channels). A backward scan runs in
reverse instead of flipping the sequence twice, so its per-token quantities come out already in
sequence order.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mambamerge.models.fused import fused_forward, unsupported_reason
from mambamerge.ops import (FusedKernels, fused_kernels, selective_scan, softplus, softplus_with_row_mean,
                            triton_kernels)
from mambamerge.tokens import SSMStats

# "bi": a separate backward branch (conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b; Vim's "bimamba v2",
#       VideoMamba, AuM's Bi-Bi); "bi_shared": one convolution and projection in forward order, scanned
#       both ways with A_log and A_b_log (AuM's Fo-Bi, "bimamba v1"); "forward": one direction (AuM's Fo-Fo)
MIXER_VARIANTS = ("bi", "bi_shared", "forward")


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32 (as the official fused kernel)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps).to(dtype)


def depthwise_conv_along_sequence(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  reverse: bool) -> torch.Tensor:
    """Depthwise 1-D convolution over L, causal in scan direction.

    x: (batch, L, d); weight: (d, 1, K) as stored by nn.Conv1d; bias: (d,).
    Forward (reverse=False): out_t = bias + sum_k w[k] x[t - (K-1) + k], zeros before the start.
    Reverse: the same filter applied to the flipped sequence, i.e. out_t = bias + sum_k w[k] x[t + (K-1) - k].
    Returns (batch, L, d).
    """
    length, k_size = x.shape[1], weight.shape[-1]
    w = weight[:, 0, :]  # (d, K)
    pad = (0, 0, k_size - 1, 0) if not reverse else (0, 0, 0, k_size - 1)
    xp = F.pad(x, pad)
    out = bias.to(x.dtype).expand_as(x).clone()
    for k in range(k_size):
        start = k if not reverse else k_size - 1 - k
        out.addcmul_(xp[:, start:start + length], w[:, k].to(x.dtype))
    return out


class MambaMixer(nn.Module):
    """Mamba mixer in one of three variants (MIXER_VARIANTS), with the official parameter names and
    shapes: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj, plus conv1d_b, x_proj_b, dt_proj_b,
    A_b_log, D_b ("bi") or A_b_log alone ("bi_shared").

    divide_out: halve the sum of the two directions (Vim, AuM Bi-Bi) instead of summing them
    (VideoMamba, AuM Fo-Bi); ignored by the one-direction variant.

    scan_impl: one of mambamerge.ops.MIXER_IMPLS. "fused" runs the whole mixer through the kernels of
    causal-conv1d and mamba_ssm (models/fused.py), "triton" through torch's convolution and the Triton
    scan; "auto" takes the first of the two whose packages import and whose kernels support the mixer
    and the input (a CUDA tensor; models/fused.unsupported_reason); any other value, and "auto" otherwise,
    runs the pure-PyTorch path below with that selective scan.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, divide_out: bool = True, variant: str = "bi",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        if variant not in MIXER_VARIANTS:
            raise ValueError(f"mixer variant must be one of {', '.join(MIXER_VARIANTS)}, got {variant!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.divide_out = divide_out
        self.variant = variant
        self.scan_impl = "auto"

        d_inner = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for suffix in ("", "_b") if variant == "bi" else ("",):
            conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
            x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
            self._init_dt_proj(dt_proj, dt_min, dt_max, dt_init_floor)
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
            self.register_parameter("D" + suffix, nn.Parameter(torch.ones(d_inner)))
        for name in ("A_log", "A_b_log") if variant != "forward" else ("A_log",):
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
            self.register_parameter(name, nn.Parameter(a_log))

    @property
    def scans(self) -> int:
        """Scan directions run per call (1 or 2)."""
        return 1 if self.variant == "forward" else 2

    @property
    def branches(self) -> int:
        """Convolution + projection branches run per call (2 for "bi", else 1)."""
        return 2 if self.variant == "bi" else 1

    def _init_dt_proj(self, dt_proj: nn.Linear, dt_min: float, dt_max: float, floor: float) -> None:
        """Mamba's initialisation: softplus(bias) log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        dt_proj.bias._no_reinit = True

    def _inputs(self, x: torch.Tensor, suffix: str, reverse: bool, mean_delta: bool):
        """The scan's inputs of one branch. x: (batch, L, d_inner) -> u, delta (batch, L, d_inner) in the
        scan dtype, B, C (batch, L, d_state), and delta's mean over channels (batch, L) when mean_delta."""
        conv = getattr(self, "conv1d" + suffix)
        u = F.silu(depthwise_conv_along_sequence(x, conv.weight, conv.bias, reverse))
        dt, B, C = torch.split(getattr(self, "x_proj" + suffix)(u), [self.dt_rank, self.d_state, self.d_state],
                               dim=-1)
        scan_dtype = torch.promote_types(u.dtype, torch.float32)
        dt_proj = getattr(self, "dt_proj" + suffix)
        dt = F.linear(dt, dt_proj.weight, dt_proj.bias.to(dt.dtype)).to(scan_dtype)
        delta, delta_mean = softplus_with_row_mean(dt) if mean_delta else (softplus(dt), None)
        return u.to(scan_dtype), delta.to(scan_dtype), B.to(scan_dtype), C.to(scan_dtype), delta_mean

    def _scan(self, inputs, a_log: torch.Tensor, skip: torch.Tensor, reverse: bool) -> torch.Tensor:
        u, delta, B, C, _ = inputs
        A = -torch.exp(a_log.to(u.dtype))
        return selective_scan(u, delta, A, B, C, skip.to(u.dtype), reverse=reverse, impl=self.scan_impl)

    def _fused_kernels(self, hidden: torch.Tensor) -> Optional[FusedKernels]:
        """The kernels when this call takes the channel-major kernel path (see scan_impl), else None."""
        if self.scan_impl == "auto":
            if not hidden.is_cuda:
                return None
            usable = (k for k in (fused_kernels(), triton_kernels()) if k is not None)
            return next((k for k in usable if unsupported_reason(self, hidden, k) is None), None)
        if self.scan_impl not in ("fused", "triton"):
            return None
        kernels = fused_kernels() if self.scan_impl == "fused" else triton_kernels()
        if kernels is None:
            needs = ("the mamba_ssm and causal-conv1d packages, and at least one of them cannot be imported; "
                     "install both (they need CUDA)" if self.scan_impl == "fused" else
                     "the triton package, which cannot be imported; install the one matching your torch")
            raise RuntimeError(f"scan_impl={self.scan_impl!r} needs {needs} or use scan_impl='auto'")
        reason = unsupported_reason(self, hidden, kernels)
        if reason is not None:
            raise ValueError(f"scan_impl={self.scan_impl!r}: {reason}; use scan_impl='auto'")
        return kernels

    def forward(self, hidden: torch.Tensor, return_ssm: bool = False):
        """hidden: (batch, L, d_model) -> (batch, L, d_model), plus SSMStats when return_ssm."""
        kernels = self._fused_kernels(hidden)
        if kernels is not None:
            return fused_forward(self, hidden, kernels, return_ssm)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        fwd = self._inputs(x, "", reverse=False, mean_delta=return_ssm)
        y = self._scan(fwd, self.A_log, self.D, reverse=False)
        bwd = fwd
        if self.variant == "bi":
            bwd = self._inputs(x, "_b", reverse=True, mean_delta=return_ssm)
            y = y + self._scan(bwd, self.A_b_log, self.D_b, reverse=True)
        elif self.variant == "bi_shared":
            y = y + self._scan(fwd, self.A_b_log, self.D, reverse=True)
        y = y.to(z.dtype) * F.silu(z)
        if self.divide_out and self.scans == 2:
            y = y * 0.5
        out = self.out_proj(y)
        if not return_ssm:
            return out
        stats = SSMStats(fwd[1].transpose(1, 2), bwd[1].transpose(1, 2), fwd[2].transpose(1, 2),
                         bwd[2].transpose(1, 2), fwd[4], bwd[4])
        return out, stats


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (per sample), identity in eval."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Add -> RMSNorm -> mixer, with two streams between blocks.

    forward(hidden, residual): residual <- hidden (first block) or residual + drop_path(hidden),
    kept in float32; hidden <- mixer(norm(residual)). Returns (hidden, residual), both (batch, L, D),
    plus the mixer's SSMStats when return_ssm.
    """

    def __init__(self, d_model: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = MambaMixer(d_model, **mixer_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], return_ssm: bool = False):
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        out = self.mixer(self.norm(residual), return_ssm=return_ssm)
        if return_ssm:
            return out[0], residual, out[1]
        return out, residual
