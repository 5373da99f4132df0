"""What a model tells the merging code about its tokens: their layout, and the SSM quantities of a block.

Both rooms read this module and neither imports the other through it: model families build a
`TokenLayout` and report `SSMStats`; methods, schedules, capacity, FLOPs and pictures read them.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

CLASS_POSITIONS = ("head", "middle", "none")


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of an embedded sequence come from.

    grid: patch counts per axis, outermost first; the patches are in row-major order of the grid,
        which is the scan order (e.g. (rows, cols) for images, (frames, rows, cols) for video,
        (freq, time) for spectrograms: frequency-major).
    axes: a name per grid axis, same order ("row", "col"; "frame", "row", "col"; "freq", "time").
    cls: where the class token sits: "head" (index 0, patches after it), "middle" (index M // 2 of
        the M patches, as Vim and AuM insert it) or "none" (no class token).
    """

    grid: Tuple[int, ...]
    axes: Tuple[str, ...]
    cls: str = "middle"

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "axes", tuple(self.axes))
        if self.cls not in CLASS_POSITIONS:
            raise ValueError(f"class token position must be one of {', '.join(CLASS_POSITIONS)}, got {self.cls!r}")
        if len(self.grid) != len(self.axes):
            raise ValueError(f"grid {self.grid} and axes {self.axes} differ in length")
        if not self.grid or min(self.grid) < 1:
            raise ValueError(f"every grid axis needs at least one patch, got {self.grid}")

    @property
    def num_patches(self) -> int:
        count = 1
        for g in self.grid:
            count *= g
        return count

    @property
    def length(self) -> int:
        """Tokens of the embedded sequence: the patches plus the class token if there is one."""
        return self.num_patches + (self.cls != "none")

    @property
    def cls_index(self) -> Optional[int]:
        """Index of the class token in the embedded sequence (None without one)."""
        return {"head": 0, "middle": self.num_patches // 2, "none": None}[self.cls]

    def axis(self, name: str) -> Optional[int]:
        """Index of the grid axis called `name` ("frame", "row", ...), None when the layout has none."""
        return self.axes.index(name) if name in self.axes else None

    def patch_coordinates(self, pos: torch.Tensor) -> torch.Tensor:
        """Grid coordinates of the patch in each slot of the embedded sequence, outermost axis first.
        pos: (...) long slot indices -> (..., len(grid)) long; -1 on every axis at the class token."""
        patch = pos
        if self.cls_index is not None:
            patch = pos - (pos > self.cls_index).long() if self.cls == "middle" else pos - 1
        coords = []
        for extent in reversed(self.grid):
            coords.append(patch % extent)
            patch = patch.div(extent, rounding_mode="floor")
        coords = torch.stack(coords[::-1], dim=-1)
        if self.cls_index is None:
            return coords
        return coords.masked_fill((pos == self.cls_index)[..., None], -1)

    def describe(self) -> str:
        """E.g. "8x14x14 (frame x row x col) patches + class token at the head (index 0)"."""
        grid = "x".join(str(g) for g in self.grid)
        where = {"head": "at the head (index 0)", "middle": f"in the middle (index {self.cls_index})",
                 "none": None}[self.cls]
        cls = f" + class token {where}" if where else ", no class token"
        return f"{grid} ({' x '.join(self.axes)}) patches{cls}"


class SSMStats(NamedTuple):
    """Per-token SSM quantities of one mixer call, both scan directions in sequence order.

    delta_fwd, delta_bwd: (batch, d_inner, L) step size after bias and softplus.
    B_fwd, B_bwd:         (batch, d_state, L) input projection of the scan.
    delta_mean_fwd, delta_mean_bwd: optional (batch, L), the step size averaged over channels, when
                          the mixer computed it alongside (see `mean_delta`).
    A unidirectional mixer reports its one direction as both (the backward fields are the forward
    tensors); a mixer whose two scans share Δ and B (AuM's Fo-Bi) reports the shared tensors twice.
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
