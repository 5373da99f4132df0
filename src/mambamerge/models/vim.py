"""Vision Mamba (Vim): patch tokens with a middle class token, bidirectional Mamba blocks, cls head.

Numerically the official model (hustvl/Vim, "bimambav2 ... midclstok div2" variants) and with the
same state-dict keys, so official checkpoints load with strict=True.
"""
import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mambamerge.models.base import MambaClassifier, to_2tuple
from mambamerge.models.sizes import patch_grid
from mambamerge.tokens import TokenLayout

Size2 = Tuple[int, int]


@dataclass
class VimConfig:
    """Architecture of a Vim. img_size/patch_size/stride may be ints or (height, width) pairs."""

    embed_dim: int = 192
    depth: int = 24
    img_size: Union[int, Size2] = 224
    patch_size: Union[int, Size2] = 16
    stride: Union[int, Size2] = 16
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Optional[int] = None
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    divide_out: bool = True

    def __post_init__(self):
        self.img_size = to_2tuple(self.img_size)
        self.patch_size = to_2tuple(self.patch_size)
        self.stride = to_2tuple(self.stride)
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.embed_dim / 16)
        for name in ("embed_dim", "depth", "in_chans", "d_state", "d_conv", "expand", "dt_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"VimConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"VimConfig.num_classes must be >= 0, got {self.num_classes}")
        for axis in range(2):
            if self.img_size[axis] < self.patch_size[axis]:
                raise ValueError(f"image size {self.img_size} is smaller than the patch size {self.patch_size}")

    @property
    def grid_size(self) -> Size2:
        return patch_grid(self.img_size, self.patch_size, self.stride)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def to_dict(self) -> dict:
        return asdict(self)


class PatchEmbed(nn.Module):
    """(batch, C, H, W) -> (batch, M, D) raster-order patch tokens through a strided conv."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.in_chans = cfg.in_chans
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (batch, {self.in_chans}, H, W), got a tensor of shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"the model takes {self.in_chans}-channel images, got {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)}); convert the images or build the model with "
                             f"in_chans={x.shape[1]}")
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"the model was built for {self.img_size[0]}x{self.img_size[1]} images, got "
                             f"{x.shape[2]}x{x.shape[3]}; resize the input, or rebuild the model for that size "
                             f"with load_checkpoint(path, img_size=...) which interpolates the position embedding")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionMamba(MambaClassifier):
    """Vim classifier.

    forward(images (batch, C, H, W)) -> logits (batch, num_classes).
    Tokens: raster-order patches with the class token in the middle (index M // 2), then pos_embed.
    """

    family = "vim"
    config_class = VimConfig

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self._build_trunk(d, cfg.depth, cfg.num_classes, cfg.drop_path_rate, cfg.norm_eps, d_state=cfg.d_state,
                          d_conv=cfg.d_conv, expand=cfg.expand, dt_rank=cfg.dt_rank, divide_out=cfg.divide_out)
        self._init_weights()

    @property
    def cls_index(self) -> int:
        """Index of the class token in the embedded sequence (middle of the patch tokens)."""
        return self.layout.cls_index

    @classmethod
    def input_shape_for(cls, cfg: VimConfig) -> Tuple[int, int, int]:
        return (cfg.in_chans, *cfg.img_size)

    def token_layout(self, input_size: Union[None, int, Size2] = None) -> TokenLayout:
        """Patch grid at `input_size` ((H, W) or int; the model's own size when None), class token in
        the middle."""
        grid = self.cfg.grid_size
        if input_size is not None:
            size = (input_size, input_size) if isinstance(input_size, int) else input_size
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
                raise ValueError(f"input_size must be an int or a (height, width) pair of ints, got {input_size!r}")
            if min(size) <= 0:
                raise ValueError(f"input_size must be positive, got {input_size!r}")
            if any(i < p for i, p in zip(size, self.cfg.patch_size)):
                raise ValueError(f"input_size {tuple(size)} is smaller than the patch size {self.cfg.patch_size}")
            grid = patch_grid(size, self.cfg.patch_size, self.cfg.stride)
        return TokenLayout(grid, ("row", "col"), cls="middle")

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)  # lecun normal
        nn.init.zeros_(self.patch_embed.proj.bias)
        self._init_trunk()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (batch, C, H, W) -> tokens (batch, M + 1, D) with the class token at cls_index."""
        x = self.patch_embed(images)
        c = self.cls_index
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat((x[:, :c], cls, x[:, c:]), dim=1)
        return self.pos_drop(x + self.pos_embed.to(x.dtype))


def interpolate_pos_embed(pos_embed: torch.Tensor, old_grid: Size2, new_grid: Size2) -> torch.Tensor:
    """Resize a middle-class-token position embedding.

    pos_embed: (1, old_M + 1, D) with the class slot at old_M // 2 -> (1, new_M + 1, D) with the class
    slot at new_M // 2; the patch part is resized bicubically on its 2-D grid.
    """
    old_m = old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != old_m + 1:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} slots, expected {old_m + 1} for a grid {old_grid}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    c = old_m // 2
    cls = pos_embed[:, c:c + 1]
    patches = torch.cat((pos_embed[:, :c], pos_embed[:, c + 1:]), dim=1)
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    nc = patches.shape[1] // 2
    return torch.cat((patches[:, :nc], cls, patches[:, nc:]), dim=1)
