"""MaMe (arXiv 2508.13599): the SSM step size Δ as token importance, order-preserving merges.

Reconstruction (ALGORITHMS.md §2.1; the paper's text is not public, each choice is an option):
importance s_i = mean_d Δ^fwd_i + mean_d Δ^bwd_i of the block just run (a large Δ writes the token
strongly into the state); tokens of low s leave and each merges into its most cosine-similar remaining
token; survivors keep their order and a merged token sits in its destination's slot.

The paper as we first read it (the r least important tokens overall leave, any token may receive,
weights size x s, nothing protected) is `PAPER_AS_READ`. The defaults are what validation
measurements on two trained models support (docs/results.md, "Choosing MaMe's defaults"): a wide
protected window around the class token and evenly spaced leaving tokens; Δ weights the merges.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from mambamerge.merge.base import ReductionMethod, check_feature, delta_importance, stream
from mambamerge.merge.frames import BALANCES, SCOPES, balanced_sources, check_frame_options, scope_mask
from mambamerge.merge.matching import (most_similar, near_class_token, pair_capacity, pair_sources, similarities,
                                       spread_sources, top_band)
from mambamerge.merge.noise import Draws
from mambamerge.merge.plan import MergePlan, plan_from_selection
from mambamerge.merge.registry import register
from mambamerge.merge.state import TokenState
from mambamerge.merge.stm import injection_strength
from mambamerge.merge.tome import bipartite_capacity, bipartite_macs, bipartite_match
from mambamerge.tokens import SSMStats, TokenLayout

SOURCES = ("least_delta", "spread", "pairs", "uniform", "most_delta", "random")
# the reconstruction before the validation study (issue 9): patch(model, "mame", **PAPER_AS_READ)
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
    return delta_importance(ssm).float()


def channel_z(delta: torch.Tensor) -> torch.Tensor:
    """(B, C, L) -> each channel standardised over its L tokens (a constant channel gives zeros)."""
    mean = delta.mean(dim=2, keepdim=True)
    std = delta.std(dim=2, keepdim=True, unbiased=False)
    return (delta - mean) / std.clamp(min=1e-6)


@register
@dataclass
class MaMe(ReductionMethod):
    """Options. The defaults are the best mean top-1 at 60% and 80% reduction over validation images
    of two trained models (docs/results.md, "Choosing MaMe's defaults"); `PAPER_AS_READ` restores the
    first reconstruction: patch(model, "mame", **PAPER_AS_READ).
    sources: which tokens leave (match "global"/"window"), from the tokens outside the protected
        window. "uniform" (default): they are cut into r runs of consecutive tokens and the first of
        each run leaves (evenly spaced, no score). "spread": the least important of each run.
        "pairs": they are paired in order, the less important of each pair is a candidate and the
        r least important candidates leave (as ToMe's alternating split, no pair loses both).
        "least_delta": the r least important overall (the paper as read; they cluster in the flat
        background of our images and accuracy fell below random pruning). "most_delta" and
        "random" (drawn with `seed`) measure what the Δ ranking is worth. On validation, with the
        same window, "uniform", "spread" and "random" scored within noise of each other and
        "least_delta" lower (most at 80%): the simplest of the best is the default.
    match: "global" (default; each leaving token joins its most similar allowed token anywhere:
        "window" scored within noise of it), "window" (the most similar within `window` sequence
        positions, anywhere if none is allowed there) or
        "bipartite" (ToMe's alternating split, edges scored by similarity minus `delta_penalty` x the
        source's normalised importance; `sources`, `keep_top` and `cap` do not apply).
    window: neighbourhood for match="window" (default 4 tokens each side).
    delta_penalty: weight of the importance penalty for match="bipartite" (default 1.0).
    w_protect: tokens on each side of the class token that neither leave nor receive (STM's
        protected hidden states). Default 24, the best of 0 / 4 / 8 / 12 / 16 / 24 on validation: the
        strongest lever found (+20 to +30 points at 60%), as the diag study's leave-one-out costs
        predict (a token's distance to the class token ranks its cost far better than its Δ). Where
        a step must remove more tokens than the rest can give, the window shrinks for that step so
        every reduction stays reachable.
    keep_top: fraction of the non-class tokens, the most important by s, that receive no merge
        (MTR's keep band: destinations come from the middle band). Default 0, any token may receive:
        0.3 scored within noise of 0 on validation (54.6 vs 55.1% at 60%).
    cap: most leaving tokens one destination takes in a step (0: no limit); raised for a step where
        the allowed destinations could not hold all leaving tokens otherwise. Default 0: a cap of 1
        was within noise (56.3 vs 55.1% at 60%, 28.1 vs 27.7% at 80%).
    weight: "size_delta" (default, w = size x mean Δ: informative tokens dominate the merged
        feature; at 80% it beat "plain", 27.7 vs 25.1%), "size" (ToMe's size-weighted average) or
        "plain" (every member counts once, MTR's average).
    placement: "destination" (default; the merged token keeps the destination's slot) or "important"
        (the slot of its most important member; identical on the demo model in the first ablation).
    feature: "residual" (default; the stream the next block normalises) or "hidden", for the similarity.
    importance: the statistic that ranks tokens (sources, keep band, placement; unused by the default
        sources): "delta" (default, mean Δ forward + backward), "delta_z" (per-channel standardised Δ, largest channel, both directions:
        the Δ form that tracked leave-one-out importance best in the diag study, though weakly) or
        "injection" (mean Δ x ||B||, STM's injection strength). Merge weights ("size_delta") always use
        the mean Δ, which is positive.
    seed: generator seed for sources="random" (default 0).
    scope: the destinations a leaving token may join, for clips (frames.py): "free" (default, any),
        "frame" (tokens of its own frame; anywhere allowed if none of them is) or "tube" (its own
        spatial position in another frame, the merged token keeping the earlier slot; anywhere
        allowed if none is). Refused on layouts without frames.
    balance: "none" (default) or "frame": every frame gives its share of the leaving tokens (the
        frames with the most tokens first), spread evenly within the frame, instead of spreading them
        over the sequence outside the protected window (which takes them all from the later frames
        of a clip whose class token is at the head). With sources "uniform" or "spread" only; refused
        on layouts without frames.
    """

    sources: str = "uniform"
    match: str = "global"
    window: int = 4
    delta_penalty: float = 1.0
    w_protect: int = 24
    keep_top: float = 0.0
    cap: int = 0
    weight: str = "size_delta"
    placement: str = "destination"
    feature: str = "residual"
    importance: str = "delta"
    seed: int = 0
    scope: str = "free"
    balance: str = "none"

    name = "mame"
    needs_ssm = True

    @classmethod
    def search_space(cls) -> dict:
        return {"w_protect": [0, 8, 24, 48], "sources": ["uniform", "spread", "least_delta"],
                "match": ["global", "window"], "importance": ["delta", "delta_z"]}

    def __post_init__(self):
        if self.match not in ("global", "window", "bipartite"):
            raise ValueError(f"mame: match must be 'global', 'window' or 'bipartite', got {self.match!r}")
        if self.weight not in ("size_delta", "size", "plain"):
            raise ValueError(f"mame: weight must be 'size_delta', 'size' or 'plain', got {self.weight!r}")
        if self.placement not in ("destination", "important"):
            raise ValueError(f"mame: placement must be 'destination' or 'important', got {self.placement!r}")
        if self.window < 1:
            raise ValueError(f"mame: window must be >= 1, got {self.window}")
        if self.sources not in SOURCES:
            raise ValueError(f"mame: sources must be one of {', '.join(SOURCES)}, got {self.sources!r}")
        if self.w_protect < 0 or self.cap < 0:
            raise ValueError(f"mame: w_protect and cap must be >= 0, got {self.w_protect}, {self.cap}")
        if not 0.0 <= self.keep_top < 1.0:
            raise ValueError(f"mame: keep_top must be in [0, 1), got {self.keep_top}")
        if self.importance not in ("delta", "delta_z", "injection"):
            raise ValueError(f"mame: importance must be 'delta', 'delta_z' or 'injection', got {self.importance!r}")
        if self.scope not in SCOPES or self.balance not in BALANCES:
            raise ValueError(f"mame: scope must be one of {', '.join(SCOPES)} and balance one of {', '.join(BALANCES)}, "
                             f"got {self.scope!r}, {self.balance!r}")
        if self.match == "bipartite" and (self.scope != "free" or self.balance != "none"):
            raise ValueError("mame: scope and balance apply to match='global' or 'window', not 'bipartite'")
        if self.balance != "none" and self.sources not in ("uniform", "spread"):
            raise ValueError(f"mame: balance={self.balance!r} spreads the leaving tokens over each frame: it needs "
                             f"sources 'uniform' or 'spread', got {self.sources!r}")
        check_feature(self.feature)
        self._draws = Draws(self.seed)

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
        score = importance_score(ssm, self.importance)  # (B, L)
        length = state.length
        protected = state.cls_mask()  # (B, L), with the window around the class token, if there is one
        if state.cls_index is not None:
            protected = near_class_token(state.cls_index, length, self.protected_width(length, r))
        feat = stream(state, self.feature)
        if self.match == "bipartite":
            lo, hi = score.amin(dim=1, keepdim=True), score.amax(dim=1, keepdim=True)
            penalty = self.delta_penalty * (score - lo) / (hi - lo).clamp(min=1e-12)
            src, dst = bipartite_match(feat, protected, r, penalty)
        else:
            eligible = ~protected
            src = self._sources(state, score, eligible, r)  # (B, r)
            leaving = torch.zeros_like(eligible).scatter_(1, src, True)
            allowed = eligible & ~leaving & ~self._top_band(score, eligible, r)
            dst = self._destinations(feat, src, allowed, scope_mask(state, self.scope, src))
        w = state.size
        if self.weight == "size_delta":
            w = w * delta_importance(ssm).float()
        elif self.weight == "plain":
            w = torch.ones_like(w)
        plan = plan_from_selection(length, src, dst, w)
        if self.scope == "tube":  # a token and its later self: the merged token keeps the earlier slot
            return plan.with_slots_at(-state.pos)
        return plan.with_slots_at(score) if self.placement == "important" else plan

    def _sources(self, state, score, eligible, r):
        """(B, L) score and eligibility -> (B, r) leaving tokens by the `sources` rule."""
        if self.sources in ("spread", "uniform"):
            key = score if self.sources == "spread" else torch.zeros_like(score)
            if self.balance == "frame":  # with scope="frame", each frame keeps a token to merge into
                return balanced_sources(state, key, eligible, r, keep=int(self.scope == "frame"))
            return spread_sources(key, eligible, r)
        if self.sources == "pairs":
            return pair_sources(score, eligible, r)
        if self.sources == "most_delta":
            key = -score
        elif self.sources == "random":
            key = self._draws.uniform(score.shape, score.device)
        else:
            key = score
        return key.masked_fill(~eligible, float("inf")).topk(r, dim=1, largest=False).indices

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
