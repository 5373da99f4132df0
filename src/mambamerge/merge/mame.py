"""MaMe (arXiv 2508.13599): the SSM step size Δ as token importance, order-preserving merges.

Reconstruction (ALGORITHMS.md §2.1; the paper's text is not public, each choice is an option):
importance s_i = mean_d Δ^fwd_i + mean_d Δ^bwd_i of the block just run (a large Δ writes the token
strongly into the state); the r least important non-class tokens leave and each merges into its most
cosine-similar remaining token; weighted average with w = size * s; survivors keep their order and a
merged token sits in its destination's slot.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from mambamerge.merge.base import ReductionMethod, check_feature, delta_importance, least, stream, token_norms
from mambamerge.merge.plan import MergePlan, plan_from_selection, take_rows
from mambamerge.merge.registry import register
from mambamerge.merge.state import TokenState
from mambamerge.merge.tome import bipartite_capacity, bipartite_macs, bipartite_match
from mambamerge.tokens import SSMStats, TokenLayout

NEG = float("-inf")


@register
@dataclass
class MaMe(ReductionMethod):
    """Options:
    match: "global" (default; each leaving token joins its most similar survivor anywhere),
        "window" (only survivors within `window` sequence positions: merges stay local in the scan),
        "bipartite" (ToMe-style alternating split; edges scored by similarity minus
        `delta_penalty` x the source's normalised importance).
    window: neighbourhood for match="window" (default 4 tokens each side).
    delta_penalty: weight of the importance penalty for match="bipartite" (default 1.0).
    weight: "size_delta" (default, w = size * s: informative tokens dominate the merged feature) or
        "size" (ToMe's size-weighted average).
    placement: "destination" (default; the merged token keeps the destination's slot) or "important"
        (the slot of its most important member).
    feature: "residual" (default; the stream the next block normalises) or "hidden".
    sources: which tokens leave for match="global"/"window": "least_delta" (default, the paper's idea:
        the r least important by s), or, to measure what the Δ ranking is worth, "most_delta" (the r
        most important) or "random" (r drawn at random with `seed`; matching and weights unchanged).
    seed: generator seed for sources="random" (default 0).
    """

    match: str = "global"
    window: int = 4
    delta_penalty: float = 1.0
    weight: str = "size_delta"
    placement: str = "destination"
    feature: str = "residual"
    sources: str = "least_delta"
    seed: int = 0

    name = "mame"
    needs_ssm = True

    def __post_init__(self):
        if self.match not in ("global", "window", "bipartite"):
            raise ValueError(f"mame: match must be 'global', 'window' or 'bipartite', got {self.match!r}")
        if self.weight not in ("size_delta", "size"):
            raise ValueError(f"mame: weight must be 'size_delta' or 'size', got {self.weight!r}")
        if self.placement not in ("destination", "important"):
            raise ValueError(f"mame: placement must be 'destination' or 'important', got {self.placement!r}")
        if self.window < 1:
            raise ValueError(f"mame: window must be >= 1, got {self.window}")
        if self.sources not in ("least_delta", "most_delta", "random"):
            raise ValueError(f"mame: sources must be 'least_delta', 'most_delta' or 'random', got {self.sources!r}")
        check_feature(self.feature)
        self._generator = torch.Generator().manual_seed(self.seed)

    def capacity(self, length: int, layout: TokenLayout) -> int:
        if self.match == "bipartite":
            return bipartite_capacity(length)
        return max(length - 2, 0)

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        if self.match == "bipartite":
            return bipartite_macs(length, dim)
        return r * length * dim

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        if ssm is None:
            raise ValueError("mame needs the SSM step sizes of the block just run")
        score = delta_importance(ssm).float()  # (B, L)
        cls = state.cls_mask()
        feat = stream(state, self.feature)
        if self.match == "bipartite":
            src, dst = self._bipartite(feat, score, cls, r)
        else:
            src = least(self._source_rank(score), cls, r)  # (B, r)
            dst = self._destinations(feat, src, cls)
        w = state.size * (score if self.weight == "size_delta" else 1.0)
        plan = plan_from_selection(state.length, src, dst, w)
        return plan.with_slots_at(score) if self.placement == "important" else plan

    def _source_rank(self, score):
        """(B, L) -> the key whose r smallest non-class entries leave."""
        if self.sources == "most_delta":
            return -score
        if self.sources == "random":
            return torch.rand(score.shape, generator=self._generator).to(score.device)
        return score

    def _destinations(self, feat, src, cls):
        """Most cosine-similar surviving non-class token for each leaving token. feat (B, L, D), src (B, r).
        The leaving token's own norm does not change which token is most similar to it."""
        batch, length, _ = feat.shape
        leaving = torch.zeros(batch, length, dtype=torch.bool, device=feat.device).scatter_(1, src, True)
        sim = (take_rows(feat, src) @ feat.transpose(1, 2)) / token_norms(feat)[:, None, :]  # (B, r, L)
        blocked = (leaving | cls)[:, None, :]
        if self.match == "window":
            near = (torch.arange(length, device=feat.device)[None, None, :] - src[..., None]).abs() <= self.window
            local = sim.masked_fill(blocked | ~near, NEG)
            anywhere = sim.masked_fill(blocked, NEG).argmax(dim=-1)
            has_local = torch.isfinite(local).any(dim=-1)
            return torch.where(has_local, local.argmax(dim=-1), anywhere)
        return sim.masked_fill(blocked, NEG).argmax(dim=-1)

    def _bipartite(self, feat, score, cls, r):
        """ToMe's alternating split; an edge scores its similarity minus the penalty times its
        source's importance, normalised to [0, 1] per image."""
        lo, hi = score.amin(dim=1, keepdim=True), score.amax(dim=1, keepdim=True)
        penalty = self.delta_penalty * (score - lo) / (hi - lo).clamp(min=1e-12)
        return bipartite_match(feat, cls, r, penalty)
