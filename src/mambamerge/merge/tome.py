"""ToMe bipartite soft matching (Bolya et al., ICLR 2023) and its order-preserving variants for SSMs.

The current sequence is split alternately: A = even positions, B = odd positions. Each A token
finds its most cosine-similar B token; the r most similar edges merge (size-weighted average: a
token holding k patches counts k times). The class token, in the middle of the sequence, is masked
out of both sides, so it neither leaves nor receives a merge. ToMe's own output order (unmerged A
tokens, then all B tokens) scrambles the scan order of an SSM; the ordered variants keep the
survivors in their original relative order, a merged token sitting in its B token's slot.
"""
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch

from mambamerge.merge.base import Feature, ReductionMethod, stream, token_norms
from mambamerge.merge.frames import check_frame_options, scope_mask
from mambamerge.merge.plan import MergePlan, plan_from_selection, true_indices
from mambamerge.merge.registry import register
from mambamerge.merge.state import TokenState
from mambamerge.ops import cpu_kernels
from mambamerge.tokens import SSMStats, TokenLayout

NEG = float("-inf")


def bipartite_match(x: torch.Tensor, protected: torch.Tensor, r: int, penalty: Optional[torch.Tensor] = None,
                    outside: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The r best A -> B edges by cosine similarity.

    x: (B, L, D) features. protected: (B, L) bool, tokens that neither leave nor receive (the class
    token). penalty: optional (B, L), subtracted from the score of an edge whose A token it belongs
    to. outside: optional (B, La, Lb) bool, edges out of a scope: they rank below every edge inside one,
    so they are used only where too few A tokens have a B token in their scope. Returns src (B, r) even
    indices that leave and dst (B, r) the odd index each merges into.
    Needs r <= the unprotected even tokens and an unprotected odd token. Without a scope, inference on the
    CPU takes one kernel call (cpu_kernels.select_bipartite).
    """
    if outside is None and cpu_kernels.can_select(x):
        return cpu_kernels.select_bipartite(x, protected, penalty, r)
    norms = token_norms(x)
    dots = x[:, 0::2] @ x[:, 1::2].transpose(1, 2)  # (B, La, Lb)
    dots = dots / norms[:, None, 1::2]
    if outside is not None:  # a cosine is in [-1, 1]: 4 lower puts an edge below every edge in scope
        dots = dots - 4.0 * norms[:, 0::2, None] * outside.to(dots.dtype)
    dots = dots.masked_fill(protected[:, None, 1::2], NEG)
    best, partner = dots.max(dim=-1)  # (B, La); the A token's own norm does not change its partner
    best = best / norms[:, 0::2]
    if penalty is not None:
        best = best - penalty[:, 0::2]
    chosen = best.masked_fill(protected[:, 0::2], NEG).topk(r, dim=1).indices  # (B, r) among A
    return 2 * chosen, 2 * partner.gather(1, chosen) + 1


def bipartite_capacity(length: int) -> int:
    """Most tokens one bipartite step can remove: under half, none below 4 tokens (a class token on the
    B side could leave no destination)."""
    return (length - 1) // 2 if length >= 4 else 0


def bipartite_macs(length: int, dim: int) -> int:
    """Similarities of every A token with every B token."""
    return ((length + 1) // 2) * (length // 2) * dim


def even_then_odd(length: int, src: torch.Tensor) -> torch.Tensor:
    """ToMe's output order as a permutation of the survivors (in ascending index): the surviving even
    tokens, then the odd ones, each group in index order. src: (B, r) -> (B, L - r)."""
    batch, r = src.shape
    keep = torch.ones(batch, length, dtype=torch.bool, device=src.device).scatter_(1, src, False)
    survivors = true_indices(keep, length - r)
    return ((survivors % 2) * length + survivors).argsort(dim=1)


@register
@dataclass
class ToMe(ReductionMethod):
    """ToMe with the survivors kept in sequence order (the ordered variant an SSM needs).

    Options:
    feature: "residual" (default; the stream the next block normalises, as MaMe and STM compare) or
        "hidden" (the last block's output).
    scope: "free" (default) or "frame", for clips (frames.py): an A token's edges to B tokens of other
        frames rank below every edge within its frame, so a merge crosses frames only where too few A
        tokens have a B token in theirs. No "tube": A and B alternate, so a token and its own position
        in another frame fall on one side whenever a frame holds an even number of tokens (the video
        demo's 16); mame's scope="tube" merges along time. Refused on layouts without frames.

    At most (L - 1) // 2 tokens leave per step (under half; the class token's side loses one
    candidate), and none from fewer than 4 tokens, where the class token could leave B empty.
    """

    feature: Feature = "residual"
    scope: Literal["free", "frame"] = "free"

    name = "tome"
    ordered = True

    @classmethod
    def search_space(cls, layout: TokenLayout) -> dict:
        space = {"feature": ["residual", "hidden"]}
        return dict(space, scope=["free", "frame"]) if layout.axis("frame") is not None else space

    def capacity(self, length: int, layout: TokenLayout) -> int:
        check_frame_options(self.name, layout, self.scope)
        return bipartite_capacity(length)

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        return bipartite_macs(length, dim)

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        outside = None
        if self.scope == "frame":
            even = torch.arange(0, state.length, 2, device=state.pos.device).expand(state.pos.shape[0], -1)
            outside = ~scope_mask(state, self.scope, even)[:, :, 1::2]  # (B, La, Lb)
        src, dst = bipartite_match(stream(state, self.feature), state.cls_mask(), r, outside=outside)
        order = None if self.ordered else even_then_odd(state.length, src)
        return plan_from_selection(state.length, src, dst, state.size, order=order)


@register
@dataclass
class ToMeUnordered(ToMe):
    """ToMe's own output order: the unmerged A (even) tokens in their order, then all B (odd) tokens
    in theirs. The scan order is scrambled, the weakness MaMe and R-MeeTo point out for SSMs; the
    class token's new index is tracked exactly. Options as `tome`."""

    name = "tome_unordered"
    ordered = False


@register
@dataclass
class RMeeTo(ToMe):
    """R-MeeTo (Shi et al., CVPR 2025): ordered ToMe merging with the metric on the hidden states.

    Options:
    feature: "hidden" (default, as R-MeeTo compares the blocks' hidden states) or "residual".
    scope: as tome.

    Its published schedule is r tokens before blocks 2, 4, ..., 22 of 24 (r = 5 for Vim-Ti, 11 for
    Vim-S/B), chosen by the caller: patch(model, "rmeeto", schedule="constant", r=5, start=2,
    every=2). That removes 11 r tokens, an average reduction of 5.5 r / 197. R-MeeTo then re-trains
    briefly (cross-entropy + 0.5 KL to the dense teacher); this module is the merging alone.
    """

    feature: Feature = "hidden"

    name = "rmeeto"
