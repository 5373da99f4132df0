"""STM, "Sequential Token Merging: Revisiting Hidden States" (arXiv 2509.22691).

Each scan direction depends on its past with a dependence that fades with distance, so a merge k
tokens from the class token perturbs the class feature by about gamma^k: merge only sequence-adjacent
tokens, symmetrically on both sides of the class token, and never inside a protected window around
it. Reconstruction (each choice is an option; docs/merging.md, "Methods"):

- sources are the tokens at even distance k > w_protect from the class token; each picks the more
  similar (cosine, residual stream) of its two neighbours on its side, which are at odd distances, so
  destinations are never sources and order is preserved without a sort;
- the best r/2 sources on each side of the class token merge (an odd r's extra one on the longer side);
  with the class token at the head of the sequence (VideoMamba) all r merge on its one side;
- merge weights are the injection strength of the block just run, e_j = mean_d(Δ_j) * ||B_j||
  (averaged over the two scan directions), times size; a weighted average by default.
"""
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from mambamerge.merge.base import Feature, ReductionMethod, stream, token_norms
from mambamerge.merge.frames import check_frame_options, frame_and_place
from mambamerge.merge.plan import MergePlan, checks_values, plan_from_selection, true_indices
from mambamerge.merge.registry import register
from mambamerge.merge.state import TokenState
from mambamerge.ops import cpu_kernels
from mambamerge.tokens import SSMStats, TokenLayout

NEG = float("-inf")


def injection_strength(ssm: SSMStats) -> torch.Tensor:
    """How strongly each token is written into the state: mean_d(Δ) * ||B||, both directions averaged.
    (B, d_inner, L), (B, N, L) -> (B, L)."""
    delta_fwd, delta_bwd = ssm.mean_delta()
    return 0.5 * (delta_fwd * ssm.B_fwd.norm(dim=1) + delta_bwd * ssm.B_bwd.norm(dim=1))


@register
@dataclass
class STM(ReductionMethod):
    """Options:
    w_protect: tokens on each side of the class token never merged (default 4: the paper protects
        the hidden states around the class token; with gamma^k fading, 4 steps is where the
        dependence has mostly decayed in trained Vims).
    weight: "injection" (default; e_j * size from the previous layer's Δ and B, the paper's
        summary) or "size".
    mode: "mean" (default; weighted average) or "sum" (weighted sum normalised by the destination's
        weight: the merged token injects what both did, for a linear scan).
    fading: subtract fading * gamma^k from the score of a source at distance k (default 0: off);
        makes merges near the class token costlier.
    gamma: decay per step of the fading cost (default 0.8).
    feature: "residual" (default) or "hidden" stream for the similarity.
    scope: "free" (default) or "frame", for clips: a pair that straddles two frames (a frame's last
        token and the next one's first) ranks below every pair within a frame, so merges cross a frame
        boundary only where a side has no pair left inside its frames. Refused on layouts without
        frames.
    """

    w_protect: int = 4
    weight: Literal["injection", "size"] = "injection"
    mode: Literal["mean", "sum"] = "mean"
    fading: float = 0.0
    gamma: float = 0.8
    feature: Feature = "residual"
    scope: Literal["free", "frame"] = "free"

    name = "stm"

    @classmethod
    def search_space(cls, layout: TokenLayout) -> dict:
        space = {"w_protect": [0, 4, 12, 24], "weight": ["injection", "size"], "mode": ["mean", "sum"]}
        return dict(space, scope=["free", "frame"]) if layout.axis("frame") is not None else space

    def check(self):
        if self.w_protect < 0:
            raise ValueError(f"stm: w_protect must be >= 0, got {self.w_protect}")
        if self.fading < 0 or not 0 < self.gamma < 1:
            raise ValueError(f"stm: need fading >= 0 and 0 < gamma < 1, got {self.fading}, {self.gamma}")

    @property
    def needs_ssm(self) -> bool:
        return self.weight == "injection"

    def _side_capacity(self, n: int) -> int:
        """Sources on a side of n tokens: even distances k in (w_protect, n] with a neighbour that may
        take them (k - 1 outside the window, or k + 1 <= n)."""
        return sum(1 for k in range(2, n + 1, 2) if k > self.w_protect and (k - 1 > self.w_protect or k + 1 <= n))

    def capacity(self, length: int, layout: TokenLayout) -> int:
        check_frame_options(self.name, layout, self.scope)
        if layout.cls == "none":
            raise ValueError("stm merges around the class token, and this model has none; use another method")
        if layout.cls == "head":
            return self._side_capacity(length - 1)
        # the class token sits in the middle; one token of slack for a side left shorter by an odd r
        return 2 * self._side_capacity(max((length - 1) // 2 - 1, 0))

    def overhead_macs(self, length: int, r: int, dim: int) -> int:
        return length * dim

    def _check_sides(self, available: torch.Tensor, counts: torch.Tensor) -> None:
        """available, counts: (B, 2) candidates and merges on each side of the class token."""
        short = counts > available
        if bool(short.any()):
            image, side = (int(i) for i in short.nonzero()[0])
            raise ValueError(f"stm: {int(counts[image, side])} merges asked on one side of the class token but only "
                             f"{int(available[image, side])} adjacent pairs are available outside the protected "
                             f"window (w_protect={self.w_protect}); lower the reduction or w_protect")

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        feat = stream(state, self.feature)  # (B, L, D)
        batch, length, _ = feat.shape
        device = feat.device
        if batch == 0:  # no image: the plan of r merges, for none
            none = torch.zeros(0, r, dtype=torch.long, device=device)
            return plan_from_selection(length, none, none, state.size, mode=self.mode)
        if self.scope == "free" and cpu_kernels.can_select(feat):
            src, dst = cpu_kernels.select_adjacent(feat, state.cls_index, self.w_protect, r, self.fading, self.gamma)
        else:
            src, dst = self._pairs(state, feat, r)
        w = state.size
        if self.weight == "injection":
            w = w * injection_strength(ssm).float()
        return plan_from_selection(length, src, dst, w, mode=self.mode)

    def _pairs(self, state: TokenState, feat: torch.Tensor, r: int):
        """The r adjacent (source, destination) pairs that merge: (B, r) each."""
        batch, length, _ = feat.shape
        device = feat.device
        norms = token_norms(feat)
        pair = torch.linalg.vecdot(feat[:, :-1], feat[:, 1:]) / (norms[:, :-1] * norms[:, 1:])  # cos(t, t+1)
        pair = pair.nan_to_num(nan=-1.0, posinf=1.0, neginf=-1.0)  # an image of NaN / inf: any valid plan
        if self.scope == "frame":  # cosines are in [-1, 1]: a straddling pair ranks below every other one
            frame, _ = frame_and_place(state)
            pair = pair - 4.0 * (frame[:, :-1] != frame[:, 1:]).to(pair.dtype)
        sims = F.pad(pair, (1, 1), value=NEG)  # (B, L + 1): cos(t - 1, t) at t, cos(t, t + 1) at t + 1

        # candidate sources: even distances k > w_protect, left of the class token then right of it
        k = torch.arange(self.w_protect + 1 + (self.w_protect + 1) % 2, length, 2, device=device)  # (K,)
        n_k = k.numel()
        k_all = torch.cat((k, k))  # (2K,) the distance of each candidate
        left = torch.arange(2 * n_k, device=device) < n_k  # (2K,)
        src_all = torch.cat((state.cls_index[:, None] - k, state.cls_index[:, None] + k), dim=1)  # (B, 2K)
        t = src_all.clamp(0, length - 1)
        before, after = sims.gather(1, t), sims.gather(1, t + 1)
        # inward (towards the class token) is t + 1 on the left, t - 1 on the right; at k = w_protect + 1
        # (odd w_protect) the inward neighbour is inside the protected window
        inward = torch.where(left, after, before).masked_fill(k_all - 1 <= self.w_protect, NEG)
        outward = torch.where(left, before, after)
        go_out = outward > inward
        score = torch.maximum(inward, outward)
        if self.fading:
            score = score - self.fading * self.gamma ** k_all.float()
        score = score.masked_fill((src_all < 0) | (src_all >= length), NEG)
        outward_step = torch.where(left, -1, 1)
        dst_all = src_all + torch.where(go_out, outward_step, -outward_step)

        # an odd r gives its extra merge to the longer side, so the sides never drift apart; a class
        # token at the head has one side. Counts per image, as tensors: torch.compile needs no Python ints
        cls = state.cls_index
        r_left = torch.where(cls == 0, 0, r // 2 + (r % 2) * (2 * cls > length - 1).long())  # (B,)
        counts = torch.stack((r_left, r - r_left), dim=1)  # (B, 2) merges left and right of the class token
        if checks_values(counts):
            self._check_sides(torch.isfinite(score).view(batch, 2, n_k).sum(dim=2), counts)
        # the best `counts` candidates of each side, left ones first, each side best first
        ranked = score.view(batch, 2, n_k).topk(min(r, n_k), dim=2).indices  # (B, 2, k)
        ranked = ranked + torch.arange(0, 2 * n_k, n_k, device=device)[None, :, None]
        chosen = torch.arange(ranked.shape[2], device=device) < counts[..., None]  # (B, 2, k)
        picks = ranked.view(batch, -1).gather(1, true_indices(chosen.view(batch, -1), r))  # (B, r)
        return src_all.gather(1, picks), dst_all.gather(1, picks)
