"""The residual block and the bidirectional ("bimamba v2") Mamba mixer shared by all model families.

Everything runs sequence-major, channels last: (batch, L, channels). The backward branch of the
mixer scans in reverse instead of flipping the sequence twice, so its per-token quantities come
out already in sequence order.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mambamerge.ops import selective_scan, softplus, softplus_with_row_mean


class SSMStats(NamedTuple):
    """Per-token SSM quantities of one mixer call, both directions in sequence order.

    delta_fwd, delta_bwd: (batch, d_inner, L) step size after bias and softplus.
    B_fwd, B_bwd:         (batch, d_state, L) input projection of the scan.
    delta_mean_fwd, delta_mean_bwd: optional (batch, L), the step size averaged over channels, when
                          the mixer computed it alongside (see `mean_delta`).
    """

    delta_fwd: torch.Tensor
    delta_bwd: torch.Tensor
    B_fwd: torch.Tensor
    B_bwd: torch.Tensor
    delta_mean_fwd: Optional[torch.Tensor] = None
    delta_mean_bwd: Optional[torch.Tensor] = None

    def mean_delta(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each token's step size averaged over channels, forward and backward: (batch, L) x2."""
        if self.delta_mean_fwd is not None and self.delta_mean_bwd is not None:
            return self.delta_mean_fwd, self.delta_mean_bwd
        return self.delta_fwd.mean(dim=1), self.delta_bwd.mean(dim=1)


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


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer with separate forward/backward SSM parameters (Vim "bimamba v2").

    Parameter names and shapes match the official checkpoints: in_proj, conv1d(_b), x_proj(_b),
    dt_proj(_b), A_log / A_b_log, D / D_b, out_proj.

    divide_out: average the two directions (Vim) instead of summing them (VideoMamba).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, divide_out: bool = True,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.divide_out = divide_out
        self.scan_impl = "auto"

        d_inner = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
            x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
            self._init_dt_proj(dt_proj, dt_min, dt_max, dt_init_floor)
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
            self.register_parameter("A_log" if not suffix else "A_b_log", nn.Parameter(a_log))
            self.register_parameter("D" + suffix, nn.Parameter(torch.ones(d_inner)))

    def _init_dt_proj(self, dt_proj: nn.Linear, dt_min: float, dt_max: float, floor: float) -> None:
        """Mamba's initialisation: softplus(bias) log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        dt_proj.bias._no_reinit = True

    def _branch(self, x: torch.Tensor, suffix: str, reverse: bool, mean_delta: bool = False):
        """One scan direction. x: (batch, L, d_inner) -> y (batch, L, d_inner), delta (batch, L, d_inner),
        B (batch, L, d_state), and delta's mean over channels (batch, L) when mean_delta (else None)."""
        conv = getattr(self, "conv1d" + suffix)
        x_proj = getattr(self, "x_proj" + suffix)
        dt_proj = getattr(self, "dt_proj" + suffix)
        a_log = self.A_log if not suffix else self.A_b_log
        skip = getattr(self, "D" + suffix)

        u = F.silu(depthwise_conv_along_sequence(x, conv.weight, conv.bias, reverse))
        dt, B, C = torch.split(x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        scan_dtype = torch.promote_types(u.dtype, torch.float32)
        dt = F.linear(dt, dt_proj.weight, dt_proj.bias.to(dt.dtype)).to(scan_dtype)
        delta, delta_mean = softplus_with_row_mean(dt) if mean_delta else (softplus(dt), None)
        A = -torch.exp(a_log.to(scan_dtype))
        y = selective_scan(u.to(scan_dtype), delta.to(scan_dtype), A, B.to(scan_dtype),
                           C.to(scan_dtype), skip.to(scan_dtype), reverse=reverse, impl=self.scan_impl)
        return y, delta, B, delta_mean

    def forward(self, hidden: torch.Tensor, return_ssm: bool = False):
        """hidden: (batch, L, d_model) -> (batch, L, d_model), plus SSMStats when return_ssm."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        y_f, delta_f, B_f, mean_f = self._branch(x, "", reverse=False, mean_delta=return_ssm)
        y_b, delta_b, B_b, mean_b = self._branch(x, "_b", reverse=True, mean_delta=return_ssm)
        y = (y_f + y_b).to(z.dtype) * F.silu(z)
        if self.divide_out:
            y = y * 0.5
        out = self.out_proj(y)
        if not return_ssm:
            return out
        stats = SSMStats(delta_f.transpose(1, 2), delta_b.transpose(1, 2), B_f.transpose(1, 2), B_b.transpose(1, 2),
                         mean_f, mean_b)
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
        self.mixer = BiMambaMixer(d_model, **mixer_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], return_ssm: bool = False):
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        out = self.mixer(self.norm(residual), return_ssm=return_ssm)
        if return_ssm:
            return out[0], residual, out[1]
        return out, residual
