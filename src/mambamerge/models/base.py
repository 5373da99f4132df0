"""What every model family shares: the stack of blocks, the final norm, the readout and the head.

A family subclasses `MambaClassifier`, builds its embedding and calls `_build_trunk`, and defines
`embed(x)`, `token_layout(input_size)` and `input_shape`; running the blocks and reducing tokens between
them is `runner.run_blocks`, the same for every family.
"""
import math
from typing import Tuple

import torch
from torch import nn

from mambamerge.models.blocks import Block, DropPath, RMSNorm
from mambamerge.runner import class_feature, run_blocks
from mambamerge.tokens import TokenLayout


class MambaClassifier(nn.Module):
    """embed -> blocks (two streams: hidden, residual; tokens reduced between blocks once patched with
    mambamerge.patch) -> final add + RMSNorm -> feature at the class token -> head.

    Subclasses set `cfg` (a dataclass with embed_dim, depth, num_classes, ...) and define `embed`,
    `token_layout` and `input_shape`.
    """

    cfg = None

    def _build_trunk(self, embed_dim: int, depth: int, num_classes: int, drop_path_rate: float,
                     norm_eps: float, head_drop_rate: float = 0.0, **mixer_kwargs) -> None:
        """Blocks `layers.{i}`, `norm_f`, `head`. The official models give block i the stochastic depth
        rate of block i - 1 of a linear schedule (block 0 none), and the final addition the full rate."""
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        block_rates = [0.0] + rates[:-1]
        self.layers = nn.ModuleList(Block(embed_dim, drop_path=block_rates[i], norm_eps=norm_eps, **mixer_kwargs)
                                    for i in range(depth))
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path_rate)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.token_reducer = None  # set by mambamerge.patch; not part of the state dict

    def _init_trunk(self) -> None:
        """The official initialisation of the head and of each block's output projection (prenorm
        residual rescaling by 1/sqrt(depth))."""
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for block in self.layers:
            out_proj = block.mixer.out_proj
            nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                out_proj.weight /= math.sqrt(len(self.layers))

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def layout(self) -> TokenLayout:
        """The layout of the embedded tokens at the model's own input size."""
        return self.token_layout()

    def token_layout(self, input_size=None) -> TokenLayout:
        """The layout of the embedded tokens for an input of `input_size` (the family's own form; the
        model's size when None)."""
        raise NotImplementedError

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one input sample (without the batch axis)."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Input batch -> tokens (batch, layout.length, D)."""
        raise NotImplementedError

    def set_scan_impl(self, impl: str) -> "MambaClassifier":
        """Choose the selective-scan implementation of every mixer (see mambamerge.ops.selective_scan)."""
        for block in self.layers:
            block.mixer.scan_impl = impl
        return self

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Last add + RMSNorm. (batch, L, D) x2 -> (batch, L, D)."""
        return self.norm_f(residual + self.drop_path(hidden))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input batch -> normalised class-token feature (batch, D)."""
        out = run_blocks(self.layers, self.embed(x), self.layout, self.token_reducer)
        return class_feature(self.final_norm(out.hidden, out.residual), out.cls_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))
