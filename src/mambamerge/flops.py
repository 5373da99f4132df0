"""FLOPs of a model of any family, dense or token-reducing, in the literature's convention.

"FLOPs" here are multiply-accumulates (MACs), as Vim and the token-merging papers report them.
Counted: patch embedding (M patches x the kernel's weights), per block and token in_proj, conv1d,
x_proj, dt_proj, the selective scan (9 d_inner N + 2 d_inner per token: discretisation, state update,
readout, D skip, z gate) and out_proj, then the head once. Norms, activations and additions are not
counted. Token counts come from the model's TokenLayout (any family, any class-token position).

Two conventions: "one_direction" counts the scan branch (conv1d, x_proj, dt_proj, scan) once, as the
literature does although bimamba v2 runs two branches (dense Vim-Ti 1.45 G); "both_directions" counts
what the mixer runs (Vim: both branches, 1.82 G; AuM's Fo-Bi: one branch, two scans). The merge overhead (scoring and matching, method.overhead_macs) is reported apart and
added in the totals.
"""
from dataclasses import dataclass
from typing import List, Tuple

from torch import nn

from mambamerge.merge.schedule import validate
from mambamerge.tokens import TokenLayout

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


def _token_macs(mixer) -> Tuple[int, int, int]:
    """MACs per token of one block: (in_proj + out_proj, one convolution + projection branch, one scan).
    The scan: 9 d_inner N (discretisation, state update, readout) + 2 d_inner (D skip, z gate)."""
    d, d_inner, n, rank = mixer.d_model, mixer.d_inner, mixer.d_state, mixer.dt_rank
    shared = d * 2 * d_inner + d_inner * d
    branch = d_inner * mixer.d_conv + d_inner * (rank + 2 * n) + rank * d_inner
    scan = 9 * d_inner * n + 2 * d_inner
    return shared, branch, scan


def _token_counts(model: nn.Module, layout: TokenLayout, reducer) -> List[int]:
    """Tokens entering each block under `reducer` (None: dense), starting from the layout's; every step of
    its schedule must be within its method's capacity at that length (it may not be at another input size)."""
    if reducer is None:
        return [layout.length] * len(model.layers)
    schedule = validate(reducer.schedule.removals, len(model.layers), layout.length,
                        lambda length: reducer.method.capacity(length, layout))
    return schedule.token_counts(layout.length)


def _merge_overhead(model: nn.Module, counts: List[int], reducer) -> int:
    """Sum of `reducer`'s method.overhead_macs over its steps; the step before block l sees counts[l - 1]
    tokens."""
    if reducer is None:
        return 0
    dim = model.layers[0].mixer.d_model
    return sum(reducer.method.overhead_macs(counts[b - 1], r, dim)
               for b, r in enumerate(reducer.schedule.removals) if r > 0)


def _without_channels(model: nn.Module, input_size):
    """input_size in the form the model's token_layout takes: a whole sample shape (model.input_shape's
    form, e.g. (C, H, W) as timm's pretrained_cfg and ptflops give it) loses its channel axis, which
    must be the model's."""
    in_chans = getattr(model.cfg, "in_chans", None)
    if in_chans is None or not isinstance(input_size, (tuple, list)) or len(input_size) != len(model.input_shape):
        return input_size
    channels, *rest = input_size
    if channels != in_chans:
        raise ValueError(f"input_size {tuple(input_size)} has {channels!r} channels but the model takes {in_chans}")
    return tuple(rest)


def flops(model: nn.Module, input_size=None, reducer=None) -> FlopsReport:
    """Count the MACs and the parameters of one input sample through `model` (any family, patched or not).

    input_size: count at another input size, in the family's form (Vim: (H, W) or int; see the
        model's `token_layout`) or as a whole sample shape with channels (model.input_shape's form:
        Vim (C, H, W) as timm and ptflops give it, VideoMamba (C, T, H, W)); the model's own size
        by default. A patched model's schedule removes
        the same number of tokens before each block at any size.
    Token counts per block follow the model's token reducer (mambamerge.patch) when there is one, or
    `reducer` (a TokenReducer, e.g. from patch.make_reducer) when given: the count as if the model were
    patched with it, the model left as it is.
    "one_direction" counts one convolution + projection branch and one scan per block, whatever the
    mixer runs; "both_directions" counts what it runs (Vim: two branches and two scans; AuM's Fo-Bi
    one branch and two scans; a one-direction mixer one of each).
    """
    layout = model.token_layout(_without_channels(model, input_size))
    reducer = model.token_reducer if reducer is None else reducer
    counts = _token_counts(model, layout, reducer)
    mixer = model.layers[0].mixer
    shared, branch, scan = _token_macs(mixer)
    proj = model.patch_embed.proj
    return FlopsReport(
        tokens=tuple(counts),
        patch_embed=layout.num_patches * proj.weight.numel(),
        head=model.head.weight.numel() if isinstance(model.head, nn.Linear) else 0,
        blocks_one_direction=tuple(t * (shared + branch + scan) for t in counts),
        blocks_both_directions=tuple(t * (shared + mixer.branches * branch + mixer.scans * scan) for t in counts),
        merge_overhead=_merge_overhead(model, counts, reducer),
        params=sum(p.numel() for p in model.parameters()),
    )
