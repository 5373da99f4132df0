"""Helpers shared by the family loaders: the mixer's hyper-parameters from its tensors, the depth, and
the resize of a position table with a class entry first."""
import re
from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def depth_of(sd: Dict[str, torch.Tensor]) -> int:
    """Number of blocks; they must be numbered 0 to depth - 1 without gaps."""
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    if not blocks:
        raise ValueError("the file has no blocks (no layers.{i}.* keys)")
    if blocks != list(range(len(blocks))):
        raise ValueError(f"the file has tensors for {len(blocks)} blocks numbered from {blocks[0]} to {blocks[-1]}, "
                         f"not 0 to depth - 1 without gaps: the file is damaged")
    return len(blocks)


def mixer_config(sd: Dict[str, torch.Tensor], embed_dim: int) -> dict:
    """d_state, d_conv, expand, dt_rank of block 0's mixer."""
    d_inner = sd["layers.0.mixer.in_proj.weight"].shape[0] // 2
    if d_inner % embed_dim:
        raise ValueError(f"in_proj has {2 * d_inner} outputs, not a multiple of 2 x embed_dim={embed_dim}")
    return dict(d_state=sd["layers.0.mixer.A_log"].shape[1], d_conv=sd["layers.0.mixer.conv1d.weight"].shape[-1],
                expand=d_inner // embed_dim, dt_rank=sd["layers.0.mixer.dt_proj.weight"].shape[1])


def require(sd: Dict[str, torch.Tensor], dims: Dict[str, int], family: str) -> None:
    """The tensors the architecture is read from: present, with dims[key] non-empty axes (the head,
    which a backbone file may lack, is checked when present)."""
    missing = [k for k in dims if k not in sd]
    if missing:
        raise ValueError(f"not a complete {family} checkpoint: missing {', '.join(missing)}")
    for key, ndim in {**dims, "head.weight": 2}.items():
        if key in sd and (sd[key].ndim != ndim or min(sd[key].shape) < 1):
            raise ValueError(f"{key} has shape {tuple(sd[key].shape)}, a {family}'s has {ndim} non-empty axes: the "
                             f"file is damaged")


def resize_head_table(table: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int],
                      **interpolation) -> torch.Tensor:
    """(1, 1 + old G1*G2, D), class entry first -> (1, 1 + new G1*G2, D): the patch part resized on its
    2-D grid with F.interpolate(**interpolation), the class entry kept."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    cls, patches = table[:, :1], table[:, 1:]
    dim = patches.shape[-1]
    grid = patches.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), **interpolation)
    return torch.cat((cls, grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(table.dtype)), dim=1)
