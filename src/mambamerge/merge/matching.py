"""Choosing tokens by score inside groups, and matching leaving tokens to destinations: the building
blocks MaMe and MTR share.

Every function works per image: an image's result never depends on the other images of its batch.
"""
from typing import Optional

import torch

from mambamerge.merge.base import token_norms
from mambamerge.merge.plan import checks_values, take_rows

NEG = float("-inf")


def near_class_token(cls_index: torch.Tensor, length: int, width: int) -> torch.Tensor:
    """(B,) class-token indices -> (B, L) bool, True at the class token and the `width` tokens on each
    side of it (fewer where the sequence ends)."""
    idx = torch.arange(length, device=cls_index.device)[None, :]
    return (idx - cls_index[:, None]).abs() <= width


def least_per_group(score: torch.Tensor, eligible: torch.Tensor, groups: torch.Tensor,
                    most: Optional[int] = None) -> torch.Tensor:
    """The lowest-scoring token of each run of consecutive eligible tokens.

    score: (B, L); eligible: (B, L) bool; groups: (B,) long, how many runs of (nearly) equal length
    each image's eligible tokens are cut into (1 <= groups <= its eligible tokens). The eligible tokens
    are numbered k = 0 .. n-1 in sequence order and token k is in run floor(k * groups / n). Returns
    (B, G) indices, G = the most runs of any image, the lowest index among ties; an image with fewer
    runs has -1 in its missing ones. most: G, or a bound on it, when the caller knows one (G = most
    then): neither torch.compile nor a GPU then needs a Python int from a tensor.
    """
    batch, length = score.shape
    device = score.device
    counts = eligible.sum(dim=1)  # (B,)
    rank = eligible.long().cumsum(dim=1) - 1
    n_groups = (most if most is not None else int(groups.max())) if batch else 0
    group = (rank * groups[:, None]).div(counts.clamp(min=1)[:, None], rounding_mode="floor")
    group = torch.where(eligible, group, n_groups)  # ineligible tokens go to a spare run, dropped below
    return least_in_runs(score, group, n_groups)


def least_in_runs(score: torch.Tensor, run: torch.Tensor, n_runs: int) -> torch.Tensor:
    """The lowest-scoring token of each run: score (B, L), run (B, L) long in 0 .. n_runs (n_runs: the
    token is in no run) -> (B, n_runs) indices, the lowest index among ties, -1 for an empty run."""
    batch, length = score.shape
    device = score.device
    inside = run < n_runs
    key = score.float().masked_fill(~inside, float("inf"))
    best = torch.full((batch, n_runs + 1), float("inf"), device=device).scatter_reduce(1, run, key, "amin")
    is_best = inside & (key == best.gather(1, run))
    idx = torch.arange(length, device=device).expand(batch, -1)
    first = torch.full((batch, n_runs + 1), length, dtype=torch.long, device=device).scatter_reduce(
        1, run, torch.where(is_best, idx, length), "amin")[:, :n_runs]
    return first.masked_fill(first == length, -1)


def spread_sources(score: torch.Tensor, eligible: torch.Tensor, r: int) -> torch.Tensor:
    """r leaving tokens spread over the sequence: the eligible tokens are cut into r runs of
    consecutive tokens of (nearly) equal length, and the lowest-scoring token of each run leaves.
    score, eligible: (B, L); every image needs r eligible tokens. Returns (B, r)."""
    counts = eligible.sum(dim=1)
    if r == 0 or score.shape[0] == 0:  # nothing leaves, or no image
        return torch.zeros(score.shape[0], r, dtype=torch.long, device=score.device)
    if checks_values(counts) and int(counts.min()) < r:
        raise ValueError(f"{r} sources asked but an image has only {int(counts.min())} eligible tokens")
    return least_per_group(score, eligible, torch.full_like(counts, r), most=r)


def uniform_sources(cls_index: Optional[torch.Tensor], batch: int, length: int, width: int, r: int,
                    device: torch.device) -> torch.Tensor:
    """spread_sources of equal scores (the first token of each run) in closed form, no sort or scatter:
    the eligible tokens are those outside near_class_token(cls_index, length, width), all of them
    without a class token (cls_index None). Every image needs r eligible tokens. cls_index (B,) ->
    (B, r) long."""
    run = torch.arange(r, device=device)
    if cls_index is None:
        return (run * length + (r - 1)).div(max(r, 1), rounding_mode="floor").expand(batch, -1)
    cls = cls_index[:, None]
    start = (cls - width).clamp(min=0)  # (B, 1) the window's first token
    protected = (cls + (width + 1)).clamp(max=length) - start  # (B, 1) tokens in the window
    # eligible token k is in run floor(k r / n) of the n eligible ones: each run starts at ceil(g n / r)
    rank = (run * (length - protected) + (r - 1)).div(max(r, 1), rounding_mode="floor")  # (B, r)
    return torch.where(rank < start, rank, rank + protected)


def pair_sources(score: torch.Tensor, eligible: torch.Tensor, r: int) -> torch.Tensor:
    """r leaving tokens from an alternating split: the eligible tokens are paired in sequence order
    ((0, 1), (2, 3), ...; with an odd count one run of three), the lowest-scoring token of each pair is
    a candidate, and the r lowest-scoring candidates leave, so no pair loses both tokens.
    score, eligible: (B, L); every image needs r pairs and one more eligible token. Returns (B, r)."""
    counts = eligible.sum(dim=1)
    if score.shape[0] == 0:
        return torch.zeros(0, r, dtype=torch.long, device=score.device)
    # at most L // 2 pairs: a bound known without reading counts
    candidates = least_per_group(score, eligible, (counts // 2).clamp(min=1), most=max(score.shape[1] // 2, 1))
    available = (candidates >= 0).sum(dim=1)
    if r and checks_values(counts) and (int(available.min()) < r or int(counts.min()) <= r):
        raise ValueError(f"{r} sources asked but an image has only {int(available.min())} pairs of eligible tokens")
    key = score.float().gather(1, candidates.clamp(min=0)).masked_fill(candidates < 0, float("inf"))
    return candidates.gather(1, key.topk(r, dim=1, largest=False).indices)


def pair_capacity(eligible_tokens: int) -> int:
    """Most sources pair_sources can give from that many eligible tokens."""
    return eligible_tokens // 2


def similarities(feat: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each leaving token with every token, up to the leaving token's own norm
    (which does not change which token is most similar to it). feat (B, L, D), src (B, r) -> (B, r, L)."""
    return (take_rows(feat, src) @ feat.transpose(1, 2)) / token_norms(feat)[:, None, :]


def top_band(score: torch.Tensor, eligible: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """(B, L) bool, True at the k highest-scoring eligible tokens of each image, at most as many as
    leave the image r sources and one more token (its eligible tokens - r - 1)."""
    batch, length = score.shape
    k_img = (eligible.sum(dim=1) - r - 1).clamp(min=0, max=max(k, 0))  # (B,)
    order = score.float().masked_fill(~eligible, NEG).argsort(dim=1, descending=True, stable=True)
    in_band = torch.arange(length, device=score.device)[None, :] < k_img[:, None]
    return torch.zeros(batch, length, dtype=torch.bool, device=score.device).scatter_(1, order, in_band)


def most_similar(sim: torch.Tensor, allowed: torch.Tensor, cap: int = 0,
                 local: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Destination of each leaving token: its most similar allowed token, each destination taking at
    most `cap` leaving tokens (0: no limit).

    sim: (B, r, L) similarities; allowed: (B, L) bool, the tokens that may receive (at least one per
    image). local: optional (B, r, L) bool, where each leaving token looks first; it looks anywhere
    allowed when none of those is allowed (or, with a cap, has room left).

    With a cap (and no `local`) the result is the greedy matching: the most similar (leaving token, destination) pairs
    are taken first, skipping leaving tokens already placed and destinations already full. Each round
    accepts every pair that is the best left for its leaving token and among the best `room` left for
    its destination, which is what the greedy order would take. If an image's allowed tokens cannot hold all r leaving tokens at `cap` each, its cap is raised to
    ceil(r / allowed tokens). Returns (B, r) indices.
    """
    batch, r, length = sim.shape
    sim = sim.masked_fill(~allowed[:, None, :], NEG)
    if cap <= 0 or r == 0:
        return _preferred(sim, local).argmax(dim=-1)
    n_allowed = allowed.sum(dim=1)
    host = checks_values(n_allowed)
    if host and bool((n_allowed == 0).any()):
        raise ValueError("no token may receive a merge")
    room_per = torch.maximum(torch.full_like(n_allowed, cap), (r + n_allowed - 1) // n_allowed)  # (B,)
    load = torch.zeros(batch, length, dtype=torch.long, device=sim.device)
    dst = torch.full((batch, r), -1, dtype=torch.long, device=sim.device)
    pending = torch.ones(batch, r, dtype=torch.bool, device=sim.device)
    earlier = torch.arange(r, device=sim.device)[None, :] < torch.arange(r, device=sim.device)[:, None]  # [s, s'] s' < s
    for _ in range(r):  # (on a GPU all r rounds, without reading `pending`: the rounds after the last are no-ops)
        if host and not bool(pending.any()):
            break
        pref = _preferred(sim, local)
        best = pref.argmax(dim=-1)  # (B, r)
        own = pref.gather(2, best[..., None])  # (B, r, 1)
        # column of each claimed destination: every pending leaving token's similarity to it
        rivals = pref.transpose(1, 2).gather(1, best[..., None].expand(-1, -1, r)).masked_fill(~pending[:, None, :], NEG)
        ahead = ((rivals > own) | ((rivals == own) & earlier[None])).sum(dim=-1)  # (B, r)
        won = pending & (ahead < (room_per[:, None] - load).gather(1, best))
        dst = torch.where(won, best, dst)
        load = load.scatter_add(1, best, won.long())
        pending &= ~won
        sim = sim.masked_fill((load >= room_per[:, None])[:, None, :], NEG)
    return dst


def _preferred(sim: torch.Tensor, local: Optional[torch.Tensor]) -> torch.Tensor:
    """sim (B, r, L) restricted to `local` in the rows where that leaves a finite entry."""
    if local is None:
        return sim
    near = sim.masked_fill(~local, NEG)
    return torch.where(torch.isfinite(near).any(dim=-1, keepdim=True), near, sim)
