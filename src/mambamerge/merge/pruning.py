"""Pruning baselines: ToP-ViM-style importance pruning, EViT-style keep-and-fuse, random dropping.

The class token is never removed. Kept tokens keep their relative order; only EViT's one fused
token is placed by an option.
"""
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from mambamerge.merge.base import ReductionMethod, delta_importance, least
from mambamerge.merge.noise import Draws
from mambamerge.merge.plan import MergePlan, plan_from_selection, true_indices
from mambamerge.merge.registry import register
from mambamerge.merge.state import TokenState
from mambamerge.tokens import SSMStats, TokenLayout


@register
@dataclass
class ToP(ReductionMethod):
    """ToP-ViM-style pruning (Zhan et al., NeurIPS 2024): drop the r least important non-class tokens;
    importance s_i = sum_d clip(h_{i,d}) over the channels of the block just run.

    ToP-ViM reads the SSM output; the model exposes the mixer output `state.hidden` (the SSM output
    gated and projected by out_proj), which is used here.

    Options:
    clip: "relu" (default; s_i = sum_d max(h_{i,d}, 0): the paper aggregates clipped channel values,
        and clipping at zero counts only a token's positive responses so that large negative
        channels cannot cancel them), "abs" (sum_d |h_{i,d}|: magnitude of either sign) or "none"
        (the plain channel sum).

    Its published schedule prunes before blocks 6, 11 and 16 (after layers 5, 10, 15), keeping 80%
    of the tokens each time. For 197 tokens and 24 blocks that is
    patch(model, "top", schedule=[0] * 6 + [39] + [0] * 4 + [32] + [0] * 4 + [25]);
    schedule="geometric", keep=0.8, start=6, every=5 gives the same three steps plus a fourth before
    block 21. ToP-ViM fine-tunes the pruned model; this module is the pruning alone.
    """

    clip: Literal["relu", "abs", "none"] = "relu"

    name = "top"

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        return length * dim

    def importance(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L) channel sum of the clipped features."""
        h = hidden.float()
        if self.clip == "relu":
            h = h.clamp(min=0)
        elif self.clip == "abs":
            h = h.abs()
        return h.sum(dim=-1)

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        src = least(self.importance(state.hidden), state.cls_mask(), r)
        return plan_from_selection(state.length, src, None, state.size)


@register
@dataclass
class EViT(ReductionMethod):
    """EViT-style pruning (Liang et al., ICLR 2022): keep the most important tokens and fuse the
    r + 1 least important non-class tokens into one, so r tokens leave in total. The fused token is
    their average weighted by size x importance, and holds all their patches.

    Options:
    importance: "delta" (default; MaMe's s_i = mean_d Δ^fwd_i + mean_d Δ^bwd_i. EViT ranks tokens by
        the class token's attention, which a Mamba block does not have; Δ is the SSM's own measure of
        how strongly a token is written into the state, and sharing it with MaMe isolates the
        difference between fusing and merging) or "norm" (L2 norm of the hidden stream: no SSM
        statistics needed).
    fused_slot: "end" (default; after the last kept token, where EViT appends it) or "cls_next"
        (right after the class token).

    The fused token takes the sequence position (`pos`) of its most important member. The other
    survivors are put in sequence-position order first, so an earlier step's fused token goes back to
    that position when the next one is placed: at most one token is ever out of sequence order.
    """

    importance: Literal["delta", "norm"] = "delta"
    fused_slot: Literal["end", "cls_next"] = "end"

    name = "evit"

    @property
    def needs_ssm(self) -> bool:
        return self.importance == "delta"

    def capacity(self, length: int, layout: TokenLayout) -> int:
        if self.fused_slot == "cls_next" and layout.cls == "none":
            raise ValueError("evit: fused_slot='cls_next' needs a class token, and this model has none; "
                             "use fused_slot='end'")
        return super().capacity(length, layout)

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        return length * dim

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        if self.importance == "delta":
            if ssm is None:
                raise ValueError("evit with importance='delta' needs the SSM step sizes of the block just run")
            score = delta_importance(ssm).float()  # (B, L)
        else:
            score = state.hidden.float().norm(dim=-1)
        batch, length = score.shape
        fused = least(score, state.cls_mask(), r + 1)  # (B, r + 1), ascending score
        src, rep = fused[:, :r], fused[:, r:]  # the most important of them keeps the slot
        keep = torch.ones(batch, length, dtype=torch.bool, device=score.device).scatter_(1, src, False)
        survivors = true_indices(keep, length - r)
        key = state.pos.gather(1, survivors).float()
        if self.fused_slot == "cls_next":
            slot = state.pos.gather(1, state.cls_index[:, None]).float() + 0.5
        else:
            slot = torch.full_like(key[:, :1], float("inf"))
        order = torch.where(survivors == rep, slot, key).argsort(dim=1)
        return plan_from_selection(length, src, rep.expand(-1, r), state.size * score, order=order)


@register
@dataclass
class RandomPrune(ReductionMethod):
    """Drop r random non-class tokens: the floor every method should beat.

    Options:
    seed: 0 (default). The method owns a stream of draws seeded with it at creation (merge/noise.py:
        a counter-based hash, so torch.compile captures it), so the same seed and the same sequence
        of forwards draw the same tokens, eager or compiled; each step advances it.
        Every image of a batch gets its own draw, so an image's draw depends on its place in the
        batch and on earlier batches (unlike the other methods, a batch is not equivalent to its
        images run one by one).
    """

    seed: int = 0

    name = "random"

    def __post_init__(self):
        super().__post_init__()
        self._draws = Draws(self.seed)

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        noise = self._draws.uniform(state.size.shape, state.size.device)
        src = least(noise, state.cls_mask(), r)
        return plan_from_selection(state.length, src, None, state.size)
