"""FLOPs of a Vim, dense or token-reducing, in the literature's convention (ALGORITHMS.md §1.4).

"FLOPs" here are multiply-accumulates (MACs), as Vim and the token-merging papers report them.
Counted: patch embedding, per block and token in_proj, conv1d, x_proj, dt_proj, the selective scan
(9 d_inner N + 2 d_inner per token: discretisation, state update, readout, D skip, z gate) and
out_proj, then the head once. Norms, activations and additions are not counted.

Two conventions: "one_direction" counts the scan branch (conv1d, x_proj, dt_proj, scan) once, as the
literature does although bimamba v2 runs two branches (dense Vim-Ti 1.45 G); "both_directions" counts
both (1.82 G). The merge overhead (scoring and matching, method.overhead_macs) is reported apart and
added in the totals.
"""
from dataclasses import dataclass
from typing import List, Tuple, Union

from torch import nn

from mambamerge.merge.schedule import validate

GIGA = 1e9


@dataclass(frozen=True)
class FlopsReport:
    """MAC counts of one forward of one image.

    tokens:                 tokens entering each block, length depth.
    patch_embed, head:      MACs of the patch embedding and the classifier.
    blocks_one_direction:   MACs of each block, scan branch counted once, length depth.
    blocks_both_directions: MACs of each block, both scan branches, length depth.
    merge_overhead:         MACs of every reduction step's scoring and matching.
    params:                 parameters of the model (all of them, head included).
    """

    tokens: Tuple[int, ...]
    patch_embed: int
    head: int
    blocks_one_direction: Tuple[int, ...]
    blocks_both_directions: Tuple[int, ...]
    merge_overhead: int
    params: int

    @property
    def one_direction(self) -> int:
        """Model MACs, scan branch once (the literature's figure), without the merge overhead."""
        return self.patch_embed + sum(self.blocks_one_direction) + self.head

    @property
    def both_directions(self) -> int:
        """Model MACs with both scan branches, without the merge overhead."""
        return self.patch_embed + sum(self.blocks_both_directions) + self.head

    @property
    def total_one_direction(self) -> int:
        return self.one_direction + self.merge_overhead

    @property
    def total_both_directions(self) -> int:
        return self.both_directions + self.merge_overhead

    @property
    def average_tokens(self) -> float:
        return sum(self.tokens) / len(self.tokens)

    def summary(self) -> dict:
        """Plain numbers, GMACs ("GFLOPs") and per-block lists."""
        return {
            "unit": "GMACs (the literature's GFLOPs)",
            "params": self.params,
            "one_direction": self.one_direction / GIGA,
            "both_directions": self.both_directions / GIGA,
            "merge_overhead": self.merge_overhead / GIGA,
            "total_one_direction": self.total_one_direction / GIGA,
            "total_both_directions": self.total_both_directions / GIGA,
            "patch_embed": self.patch_embed / GIGA,
            "head": self.head / GIGA,
            "average_tokens": self.average_tokens,
            "final_tokens": self.tokens[-1],
            "tokens": list(self.tokens),
            "blocks_one_direction": [m / GIGA for m in self.blocks_one_direction],
            "blocks_both_directions": [m / GIGA for m in self.blocks_both_directions],
        }

    def __str__(self) -> str:
        s = self.summary()
        return (f"GFLOPs (MACs): {s['one_direction']:.3f} one direction (literature), "
                f"{s['both_directions']:.3f} both directions; merge overhead {s['merge_overhead']:.4f}; "
                f"totals {s['total_one_direction']:.3f} / {s['total_both_directions']:.3f}; "
                f"tokens per block: average {s['average_tokens']:.1f}, first {self.tokens[0]}, "
                f"final {self.tokens[-1]}; {self.params / 1e6:.2f} M parameters")


def _grid(cfg, input_size: Union[None, int, Tuple[int, ...]]) -> Tuple[int, int]:
    """Patch grid (rows, cols) at input_size (H, W), (C, H, W) or int; the model's own size when None."""
    if input_size is None:
        return tuple(cfg.grid_size)
    if isinstance(input_size, (tuple, list)) and len(input_size) == 3:
        channels, *input_size = input_size
        if channels != cfg.in_chans:
            raise ValueError(f"input_size (C, H, W) has C={channels!r} but the model takes {cfg.in_chans}-channel "
                             f"images")
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        raise ValueError(f"input_size must be an int, (height, width) or (channels, height, width) of ints, got "
                         f"{input_size!r}")
    if min(size) <= 0:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    if any(i < p for i, p in zip(size, cfg.patch_size)):
        raise ValueError(f"input_size {size} is smaller than the patch size {tuple(cfg.patch_size)}")
    return tuple((i - p) // s + 1 for i, p, s in zip(size, cfg.patch_size, cfg.stride))


def _token_macs(cfg) -> Tuple[int, int]:
    """MACs per token of one block: (shared part: in_proj + out_proj, one scan direction)."""
    d, d_inner, n, rank = cfg.embed_dim, cfg.expand * cfg.embed_dim, cfg.d_state, cfg.dt_rank
    shared = d * 2 * d_inner + d_inner * d
    direction = (d_inner * cfg.d_conv + d_inner * (rank + 2 * n) + rank * d_inner
                 + 9 * d_inner * n + 2 * d_inner)
    return shared, direction


def _token_counts(model: nn.Module, initial: int) -> List[int]:
    """Tokens entering each block, starting from `initial`; every step of a patched model's schedule
    must be within its method's capacity at that length (it may not be at another input size)."""
    reducer = model.token_reducer
    if reducer is None:
        return [initial] * len(model.layers)
    schedule = validate(reducer.schedule.removals, len(model.layers), initial, reducer.method.capacity)
    return schedule.token_counts(initial)


def _merge_overhead(model: nn.Module, counts: List[int]) -> int:
    """Sum of method.overhead_macs over the steps; the step before block l sees counts[l - 1] tokens."""
    reducer = model.token_reducer
    if reducer is None:
        return 0
    dim = model.cfg.embed_dim
    return sum(reducer.method.overhead_macs(counts[b - 1], r, dim)
               for b, r in enumerate(reducer.schedule.removals) if r > 0)


def flops(model: nn.Module, input_size: Union[None, int, Tuple[int, ...]] = None) -> FlopsReport:
    """Count the MACs and parameters of one image through `model` (a VisionMamba, patched or not).

    input_size: (C, H, W) as timm's pretrained_cfg and ptflops give it, (H, W) or int, to count at
        another resolution (grid (H - p) // s + 1 per axis); the model's own image size by default.
        C must be the model's channel count. A patched model's schedule removes the same number of
        tokens before each block at any size.
    Token counts per block follow the model's token reducer (mambamerge.patch) when there is one.
    """
    cfg = model.cfg
    rows, cols = _grid(cfg, input_size)
    patches = rows * cols
    ph, pw = cfg.patch_size
    counts = _token_counts(model, patches + 1)
    shared, direction = _token_macs(cfg)
    return FlopsReport(
        tokens=tuple(counts),
        patch_embed=patches * cfg.embed_dim * cfg.in_chans * ph * pw,
        head=cfg.embed_dim * cfg.num_classes,
        blocks_one_direction=tuple(t * (shared + direction) for t in counts),
        blocks_both_directions=tuple(t * (shared + 2 * direction) for t in counts),
        merge_overhead=_merge_overhead(model, counts),
        params=sum(p.numel() for p in model.parameters()),
    )
