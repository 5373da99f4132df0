"""The residual block shared by all model families: add -> RMSNorm -> Mamba mixer (models/mixer.py).

Sequence-major, channels last: (batch, L, channels).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mambamerge.dtypes import at_least_float32, cast
from mambamerge.models.mixer import MambaMixer


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32 (as the official fused kernel)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        x = cast(x, at_least_float32(dtype))
        return cast(F.rms_norm(x, self.weight.shape, cast(self.weight, x.dtype), self.eps), dtype)


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
    plus the mixer's SSMStats when return_ssm. Float32 CPU inference runs all three in one call of the
    whole-mixer kernel (MambaMixer.kernel_forward).
    """

    def __init__(self, d_model: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = MambaMixer(d_model, **mixer_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], return_ssm: bool = False):
        # the registry read directly: nn.Module's __getattr__ costs ~0.8 us a name, against a kernel call of
        # tens of us at a few tokens
        modules = self._modules
        mixer, norm, drop_path = modules["mixer"], modules["norm"], modules["drop_path"]
        if mixer.kernel_takes(hidden, residual) and norm._parameters["weight"].dtype == torch.float32 and not (
                drop_path.training and drop_path.p > 0):
            return mixer.kernel_forward(hidden, return_ssm, residual=residual, norm=norm)
        residual = hidden if residual is None else residual + drop_path(hidden)
        residual = cast(residual, at_least_float32(residual.dtype))
        out = mixer(norm(residual), return_ssm=return_ssm)
        if return_ssm:
            return out[0], residual, out[1]
        return out, residual
