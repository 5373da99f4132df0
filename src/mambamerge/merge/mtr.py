"""MTR, "Training-free Token Reduction for Vision Mamba" (Ma et al., arXiv 2507.14042).

Our reading (through detailed third-party notes, not the PDF): a token's importance
is its step size Δ after softplus, summed over the two scan directions (the backward one in sequence
order) and averaged over channels, the same s as MaMe's. The non-class tokens are split by s into
three bands: keep (the highest, left untouched), target (the middle) and source (the lowest). Each
source merges into its most cosine-similar target by a plain average, and the survivors keep their
original order (a merged token sits in its target's slot).

Band sizes: the source band is the r tokens the schedule removes at the step; the keep band is a
fraction `keep_top` of the non-class tokens (named as MaMe's option; `keep` is the schedule's keep
ratio); the target band is the rest. The notes give no keep fraction for the paper; our default is
chosen on validation images (docs/results.md).
"""
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from mambamerge.merge.base import Feature, ReductionMethod, delta_importance, least, stream
from mambamerge.merge.matching import most_similar, similarities, top_band
from mambamerge.merge.plan import MergePlan, plan_from_selection
from mambamerge.merge.registry import register
from mambamerge.merge.state import TokenState
from mambamerge.tokens import SSMStats


@register
@dataclass
class MTR(ReductionMethod):
    """Options:
    keep_top: fraction of the non-class tokens, the most important by s, in the keep band (no merge in
        or out). Default 0.5, the best of 0.1 / 0.3 / 0.5 on validation images of both trained
        models (docs/results.md). At a step that removes so many tokens that fewer than one target
        would remain, the keep band shrinks to leave one.
    weight: "plain" (default; the paper's plain average: every member of a merge counts once) or
        "size" (size-weighted, as ToMe).
    feature: "residual" (default; the stream the next block normalises) or "hidden", for the
        similarity.
    """

    keep_top: float = 0.5
    weight: Literal["plain", "size"] = "plain"
    feature: Feature = "residual"

    name = "mtr"
    needs_ssm = True

    def check(self):
        if not 0.0 <= self.keep_top < 1.0:
            raise ValueError(f"mtr: keep_top must be in [0, 1), got {self.keep_top}")

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        return r * length * dim

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        if ssm is None:
            raise ValueError("mtr needs the SSM step sizes of the block just run")
        score = delta_importance(ssm).float()  # (B, L)
        cls = state.cls_mask()
        src = least(score, cls, r)  # (B, r) the source band
        leaving = torch.zeros_like(cls).scatter_(1, src, True)
        kept = top_band(score, ~cls, round(self.keep_top * (state.length - 1)), r)
        dst = most_similar(similarities(stream(state, self.feature), src), ~(cls | leaving | kept))
        w = state.size if self.weight == "size" else torch.ones_like(state.size)
        return plan_from_selection(state.length, src, dst, w)
