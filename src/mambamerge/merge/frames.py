"""Reduction that respects a clip's frames: where each token sits in time and space, per-frame budgets
and per-frame matching. Read from the layout (tokens.TokenLayout's "frame" axis), so the same options
work for any family whose grid has frames and are refused by name on layouts without them.

SCOPES, the destinations a leaving token may join:
    "free":  any (the methods' own rule);
    "frame": tokens of its own frame (a tubelet): frames keep their own content;
    "tube":  tokens at its own spatial position in the other frames (temporal merging: a static patch
             joins itself in a neighbouring tubelet); the merged token keeps the earlier slot.
"""
from typing import Optional

import torch

from mambamerge.merge.plan import checks_values
from mambamerge.merge.matching import least_in_runs
from mambamerge.merge.state import TokenState
from mambamerge.tokens import TokenLayout

SCOPES = ("free", "frame", "tube")  # as Literal[SCOPES] in the methods' options
BALANCES = ("none", "frame")


def check_frame_options(method: str, layout: TokenLayout, scope: str = "free", balance: str = "none") -> None:
    """A ValueError naming the option when scope or balance needs frames and the layout has none."""
    wanted = [f"{name}={value!r}" for name, value, off in (("scope", scope, "free"), ("balance", balance, "none"))
              if value != off]
    if wanted and layout.axis("frame") is None:
        raise ValueError(f"{method}: {' and '.join(wanted)} need(s) tokens laid out in frames, and this model's are "
                         f"{layout.describe()}; use scope='free', balance='none' (the defaults)")


def frame_and_place(state: TokenState):
    """(B, L) frame of each token and (B, L) its place within the frame (the row-major index over the
    other grid axes), both -1 at the class token; read from the slot each token sits in."""
    layout = state.layout
    axis = layout.axis("frame")
    coords = layout.patch_coordinates(state.pos)  # (B, L, axes)
    frame = coords[..., axis]
    place = torch.zeros_like(frame)
    for i, extent in enumerate(layout.grid):
        if i != axis:
            place = place * extent + coords[..., i]
    return frame, place.masked_fill(frame < 0, -1)


def scope_mask(state: TokenState, scope: str, src: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, r, L) bool, the tokens each leaving token src (B, r) may join under `scope` (None for "free")."""
    if scope == "free":
        return None
    frame, place = frame_and_place(state)
    if scope == "frame":
        return frame.gather(1, src)[..., None] == frame[:, None, :]
    same_place = place.gather(1, src)[..., None] == place[:, None, :]
    return same_place & (frame.gather(1, src)[..., None] != frame[:, None, :])


def balanced_counts(frame: torch.Tensor, eligible: torch.Tensor, frames: int, r: int, keep: int = 0) -> torch.Tensor:
    """How many of r leaving tokens each frame gives so that the frames keep tokens as evenly as they can:
    the frames with the most tokens give first (water-filling), a frame gives at most its eligible
    tokens less `keep` (less nothing in an image whose frames could not give r so), and ties go to
    the earlier frame.

    frame: (B, L) frame of each token (-1: class token); eligible: (B, L) bool. Returns (B, frames) long
    counts summing to r in every image; a ValueError when an image's frames cannot give r."""
    batch, length = frame.shape
    device = frame.device
    one_hot = (frame[..., None] == torch.arange(frames, device=device)).long()  # (B, L, F)
    now = one_hot.sum(dim=1)  # (B, F) tokens of each frame
    most = (one_hot * eligible[..., None].long()).sum(dim=1)  # (B, F) eligible tokens of each frame
    if batch and checks_values(most) and int(most.sum(dim=1).min()) < r:
        raise ValueError(f"{r} tokens asked but the frames of an image can give only {int(most.sum(dim=1).min())}")
    kept = (most - keep).clamp(min=0)
    most = torch.where((kept.sum(dim=1) >= r)[:, None], kept, most)  # `keep` where the frames can still give r
    level = torch.arange(length + 1, device=device)[None, :, None]  # (1, T, 1) tokens left per frame
    left = torch.minimum(torch.maximum(level, (now - most)[:, None, :]), now[:, None, :])  # (B, T, F)
    given = (now[:, None, :] - left).sum(dim=2)  # (B, T), decreasing in the level
    lowest = (given > r).sum(dim=1)  # (B,) the lowest level that gives at most r
    at = left.gather(1, lowest[:, None, None].expand(-1, 1, frames))[:, 0]  # (B, F) tokens left there
    below = left.gather(1, (lowest - 1).clamp(min=0)[:, None, None].expand(-1, 1, frames))[:, 0]
    can_go_lower = below < at  # frames at the level that would give one more one level down
    extra = r - (now - at).sum(dim=1)  # (B,) fewer than the frames that can go lower
    first = can_go_lower & (can_go_lower.long().cumsum(dim=1) <= extra[:, None])
    return now - at + first.long()


def runs_by_frame(frame: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Cut each frame's eligible tokens into counts[f] runs of consecutive tokens of (nearly) equal
    length, numbered frame by frame: frame (B, L), eligible (B, L) bool, counts (B, F) -> (B, L) run
    of each token in 0 .. r - 1 (r = counts' row sum), r for tokens in no run (ineligible, or in a
    frame that gives nothing)."""
    frames = counts.shape[1]
    r = counts.sum(dim=1, keepdim=True)  # (B, 1)
    one_hot = (frame[..., None] == torch.arange(frames, device=frame.device)) & eligible[..., None]  # (B, L, F)
    rank = (one_hot.long().cumsum(dim=1) - 1).mul(one_hot).sum(dim=2)  # (B, L) rank within its frame
    f = frame.clamp(min=0)
    n = one_hot.sum(dim=1).gather(1, f)  # (B, L) eligible tokens of its frame
    c = counts.gather(1, f)  # (B, L) runs of its frame
    offset = (counts.cumsum(dim=1) - counts).gather(1, f)
    run = offset + (rank * c).div(n.clamp(min=1), rounding_mode="floor")
    return torch.where(eligible & (frame >= 0) & (c > 0), run, r.expand_as(run))


def balanced_sources(state: TokenState, score: torch.Tensor, eligible: torch.Tensor, r: int,
                     keep: int = 0) -> torch.Tensor:
    """r leaving tokens, each frame giving its share (balanced_counts, keeping `keep` eligible tokens
    per frame where it can) spread over the frame: the lowest-scoring token of each run of its eligible
    tokens (equal scores: the first of each run). score, eligible: (B, L). Returns (B, r)."""
    frame, _ = frame_and_place(state)
    frames = state.layout.grid[state.layout.axis("frame")]
    counts = balanced_counts(frame, eligible, frames, r, keep)
    return least_in_runs(score, runs_by_frame(frame, eligible, counts), r)
