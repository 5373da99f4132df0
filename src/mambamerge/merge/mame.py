"""MaMe (arXiv 2508.13599): the SSM step size Δ as token importance, order-preserving merges.

Reconstruction (the paper's text is not public, each choice is an option):
importance s_i = mean_d Δ^fwd_i + mean_d Δ^bwd_i of the block just run (a large Δ writes the token
strongly into the state); tokens of low s leave and each merges into its most cosine-similar remaining
token; survivors keep their order and a merged token sits in its destination's slot.

The paper as we first read it (the r least important tokens overall leave, any token may receive,
weights size x s, nothing protected) is `PAPER_AS_READ`. The defaults are what validation
measurements on two trained models support (docs/results.md, "Choosing MaMe's defaults"): a wide
protected window around the class token and evenly spaced leaving tokens; Δ weights the merges.
"""
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from mambamerge.dtypes import cast
from mambamerge.merge.base import Feature, ReductionMethod, delta_importance, stream
from mambamerge.merge.frames import BALANCES, SCOPES, balanced_sources, check_frame_options, scope_mask
from mambamerge.merge.matching import (most_similar, near_class_token, pair_capacity, pair_sources, similarities,
                                       spread_sources, top_band, uniform_sources)
from mambamerge.merge.noise import Draws
from mambamerge.merge.plan import MergePlan, plan_from_selection
from mambamerge.merge.registry import register
from mambamerge.merge.state import TokenState
from mambamerge.merge.stm import injection_strength
from mambamerge.merge.tome import bipartite_capacity, bipartite_macs, bipartite_match
from mambamerge.ops import cpu_kernels
from mambamerge.tokens import SSMStats, TokenLayout

# the reconstruction before the validation study (docs/results.md): patch(model, "mame", **PAPER_AS_READ)
PAPER_AS_READ = dict(match="global", sources="least_delta", w_protect=0, keep_top=0.0, cap=0, weight="size_delta",
                     placement="destination", importance="delta")


def importance_score(ssm: SSMStats, kind: str) -> torch.Tensor:
    """(B, L) token importance from the SSM statistics of the block just run.

    "delta": mean_d Δ^fwd + mean_d Δ^bwd. "delta_z": each channel's Δ standardised over the image's
    tokens (z-score), the largest over channels, forward + backward: a token counts as important when
    some channel writes it much more strongly than that channel writes the other tokens.
    "injection": mean_d Δ x ||B||, averaged over the directions (STM's injection strength)."""
    if kind == "injection":
        return injection_strength(ssm).float()
    if kind == "delta_z":
        return sum(channel_z(d.float()).amax(dim=1) for d in (ssm.delta_fwd, ssm.delta_bwd))
    return cast(delta_importance(ssm), torch.float32)


def channel_z(delta: torch.Tensor) -> torch.Tensor:
    """(B, C, L) -> each channel standardised over its L tokens (a constant channel gives zeros)."""
    mean = delta.mean(dim=2, keepdim=True)
    std = delta.std(dim=2, keepdim=True, unbiased=False)
    return (delta - mean) / std.clamp(min=1e-6)


@register
@dataclass
class MaMe(ReductionMethod):
    """Options (defaults chosen on validation images: docs/results.md, "Choosing MaMe's defaults";
    `PAPER_AS_READ` restores the first reconstruction).
    sources: which tokens leave, from those outside the protected window. "uniform" (default): the
        first of each of r runs of consecutive tokens; "spread": the least important of each run;
        "pairs": the r least important of the less important of each pair in order; "least_delta": the
        r least important overall (the paper as read); "most_delta", "random" (drawn with `seed`).
    match: where a leaving token goes. "global" (default): its most similar allowed token; "window":
        the most similar within `window` positions (anywhere if none is allowed there); "bipartite":
        ToMe's alternating split, similarity minus `delta_penalty` x the source's normalised importance.
    window: neighbourhood for match="window" (default 4 tokens each side).
    delta_penalty: weight of the importance penalty for match="bipartite" (default 1.0).
    w_protect: tokens on each side of the class token that neither leave nor receive (default 24);
        narrowed for a step that must remove more tokens than the rest can give.
    keep_top: fraction of the non-class tokens, the most important, that receive no merge (default 0).
    cap: most leaving tokens one destination takes in a step (default 0: no limit; raised for a step
        whose destinations could not hold all leaving tokens otherwise).
    weight: merge weights. "size_delta" (default, size x mean Δ), "size" (ToMe's) or "plain" (MTR's).
    placement: "destination" (default; the merged token keeps the destination's slot) or "important"
        (the slot of its most important member).
    feature: "residual" (default) or "hidden", the stream compared for similarity.
    importance: what ranks tokens for sources, keep band and placement. "delta" (default, mean Δ
        forward + backward), "delta_z" (per-channel standardised Δ, largest channel) or "injection"
        (mean Δ x ||B||, STM's). Merge weights always use the mean Δ.
    seed: generator seed for sources="random" (default 0).
    scope: destinations a leaving token may join in a clip (frames.py): "free" (default), "frame" (its
        own frame) or "tube" (its own spatial position in another frame). Needs frames.
    balance: "none" (default) or "frame" (every frame gives its share of the leaving tokens); with
        sources "uniform" or "spread" only. Needs frames.
    match="bipartite" ignores sources, keep_top, cap, scope and balance: setting one of them with it
    is an error.
    """

    sources: Literal["least_delta", "spread", "pairs", "uniform", "most_delta", "random"] = "uniform"
    match: Literal["global", "window", "bipartite"] = "global"
    window: int = 4
    delta_penalty: float = 1.0
    w_protect: int = 24
    keep_top: float = 0.0
    cap: int = 0
    weight: Literal["size_delta", "size", "plain"] = "size_delta"
    placement: Literal["destination", "important"] = "destination"
    feature: Feature = "residual"
    importance: Literal["delta", "delta_z", "injection"] = "delta"
    seed: int = 0
    scope: Literal[SCOPES] = "free"
    balance: Literal[BALANCES] = "none"

    name = "mame"
    needs_ssm = True
    overrides = {"match": {"bipartite": ("sources", "keep_top", "cap", "scope", "balance")}}

    @classmethod
    def search_space(cls, layout: TokenLayout) -> dict:
        space = {"w_protect": [0, 8, 24, 48], "sources": ["uniform", "spread", "least_delta"],
                 "match": ["global", "window"], "importance": ["delta", "delta_z"]}
        return dict(space, scope=list(SCOPES)) if layout.axis("frame") is not None else space

    def __post_init__(self):
        super().__post_init__()
        self._draws = Draws(self.seed)

    def check(self):
        if self.window < 1:
            raise ValueError(f"mame: window must be >= 1, got {self.window}")
        if self.w_protect < 0 or self.cap < 0:
            raise ValueError(f"mame: w_protect and cap must be >= 0, got {self.w_protect}, {self.cap}")
        if not 0.0 <= self.keep_top < 1.0:
            raise ValueError(f"mame: keep_top must be in [0, 1), got {self.keep_top}")
        if self.balance != "none" and self.sources not in ("uniform", "spread"):
            raise ValueError(f"mame: balance={self.balance!r} spreads the leaving tokens over each frame: it needs "
                             f"sources 'uniform' or 'spread', got {self.sources!r}")

    def capacity(self, length: int, layout: TokenLayout) -> int:
        check_frame_options(self.name, layout, self.scope, self.balance)
        if self.match == "bipartite":
            return bipartite_capacity(length)
        if self.sources == "pairs":
            return min(pair_capacity(length - 1), max(length - 2, 0))
        return max(length - 2, 0)

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        if self.match == "bipartite":
            return bipartite_macs(length, dim)
        return r * length * dim

    def protected_width(self, length: int, r: int) -> int:
        """The protected window for a step removing r of `length` tokens: w_protect, narrowed until the
        tokens outside it (at least length - 1 - 2w of them) can give r sources and keep a destination."""
        for width in range(self.w_protect, -1, -1):
            outside = length - 1 - 2 * width
            if self.match == "bipartite":
                enough = (length + 1) // 2 - width - 1 >= r  # a window of 2w + 1 holds at most w + 1 even tokens
            elif self.sources == "pairs":
                enough = pair_capacity(outside) >= r and outside >= r + 1
            else:
                enough = outside >= r + 1
            if enough:
                return width
        return 0

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        if ssm is None:
            raise ValueError("mame needs the SSM step sizes of the block just run")
        delta = importance_score(ssm, "delta")  # (B, L), the merge weights' and the default importance
        score = delta if self.importance == "delta" else importance_score(ssm, self.importance)
        length = state.length
        width = 0 if state.cls_index is None else self.protected_width(length, r)
        feat = stream(state, self.feature)
        if self._selects_in_one_call(feat):
            reach = self.window if self.match == "window" else 0
            least = self.sources not in ("uniform", "spread")
            key = self._ranking_key(score) if least else score if self.sources == "spread" else None
            src, dst = cpu_kernels.select_mame(feat, state.cls_index, key, width, reach, r, least)
        elif self.match == "bipartite":
            lo, hi = score.amin(dim=1, keepdim=True), score.amax(dim=1, keepdim=True)
            penalty = self.delta_penalty * (score - lo) / (hi - lo).clamp(min=1e-12)
            src, dst = bipartite_match(feat, self._protected(state, width), r, penalty)
        else:
            eligible = ~self._protected(state, width)
            src = self._sources(state, score, eligible, r, width)  # (B, r)
            allowed = eligible.scatter(1, src, False)
            if self.keep_top:
                allowed &= ~self._top_band(score, eligible, r)
            dst = self._destinations(feat, src, allowed, scope_mask(state, self.scope, src))
        w = state.size
        if self.weight == "size_delta":
            w = w * delta
        elif self.weight == "plain":
            w = torch.ones_like(w)
        plan = plan_from_selection(length, src, dst, w)
        if self.scope == "tube":  # a token and its later self: the merged token keeps the earlier slot
            return plan.with_slots_at(-state.pos)
        return plan.with_slots_at(score) if self.placement == "important" else plan

    def _selects_in_one_call(self, feat: torch.Tensor) -> bool:
        """Whether the sources and their match run as one kernel call (inference on the CPU): any sources
        but pairs, a global or windowed match, no top band, cap, scope or balance."""
        return (self.sources != "pairs" and self.match != "bipartite" and self.balance == "none"
                and not self.keep_top and not self.cap and self.scope == "free" and cpu_kernels.can_select(feat))

    @staticmethod
    def _protected(state: TokenState, width: int) -> torch.Tensor:
        """(B, L) bool: the class token and the window of `width` around it, if there is one."""
        return state.cls_mask() if state.cls_index is None else near_class_token(state.cls_index, state.length, width)

    def _sources(self, state, score, eligible, r, width):
        """(B, L) score and eligibility (outside the class token's window of `width`) -> (B, r) leaving
        tokens by the `sources` rule."""
        if self.sources == "uniform" and self.balance == "none":
            return uniform_sources(state.cls_index, score.shape[0], state.length, width, r, score.device)
        if self.sources in ("spread", "uniform"):
            key = score if self.sources == "spread" else torch.zeros_like(score)
            if self.balance == "frame":  # with scope="frame", each frame keeps a token to merge into
                return balanced_sources(state, key, eligible, r, keep=int(self.scope == "frame"))
            return spread_sources(key, eligible, r)
        if self.sources == "pairs":
            return pair_sources(score, eligible, r)
        return self._ranking_key(score).masked_fill(~eligible, float("inf")).topk(r, dim=1, largest=False).indices

    def _ranking_key(self, score: torch.Tensor) -> torch.Tensor:
        """(B, L): the key whose r lowest eligible tokens leave, for sources least_delta, most_delta and
        random (a random one draws afresh)."""
        if self.sources == "most_delta":
            return -score
        if self.sources == "random":
            return self._draws.uniform(score.shape, score.device)
        return score

    def _top_band(self, score, eligible, r):
        """(B, L) bool: the keep_top most important eligible tokens."""
        return top_band(score, eligible, round(self.keep_top * (score.shape[1] - 1)), r)

    def _destinations(self, feat, src, allowed, scope):
        """Most cosine-similar allowed token for each leaving token, within `window` positions for
        match="window" and within `scope` (B, r, L) (None: anywhere) where one is allowed there.
        feat (B, L, D), src (B, r), allowed (B, L)."""
        sim = similarities(feat, src)  # (B, r, L)
        local = scope
        if self.match == "window":
            near = (torch.arange(feat.shape[1], device=feat.device)[None, None, :] - src[..., None]).abs() <= self.window
            local = near if scope is None else near & scope
        return most_similar(sim, allowed, self.cap, local)
