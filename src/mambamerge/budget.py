"""Budgets of mambamerge.tune met exactly: a GMACs budget as the tokens summed over blocks it allows, and a
schedule refitted, at its own step blocks or at any, to an exact sum of tokens over blocks.

GMACs here are those of every GMACs column of mambamerge: one scan direction (the literature's
"GFLOPs", mambamerge.flops' total_one_direction), the method's merge overhead included. Every block
costs the same per token, so the MACs of a schedule are fixed + token_macs * (tokens summed over blocks)
+ its merge overhead."""
import math
import numbers
from collections import deque
from typing import List, Optional, Sequence

from mambamerge.flops import flops
from mambamerge.merge.schedule import Schedule
from mambamerge.patch import make_reducer

GIGA = 1e9


def token_macs(model) -> int:
    """MACs of one token through one block, one scan direction: what a schedule saves per token it removes
    from one block (the finest step of a GMACs budget)."""
    report = flops(model)
    return report.blocks_one_direction[0] // report.tokens[0]  # block 0 always sees every token


def dense_gmacs(model) -> float:
    """GMACs of one input through `model` without any token reduction (one scan direction)."""
    report = flops(model)
    return (report.patch_embed + report.head + token_macs(model) * len(model.layers) * model.layout.length) / GIGA


def schedule_macs(model, method: str, options: dict, removals: Sequence[int]) -> int:
    """MACs of one input through `model` patched with `method` (`options`) and these per-block removals,
    merge overhead included; the model is left as it is."""
    reducer = make_reducer(model, method, schedule=list(removals), **options)
    return flops(model, reducer=reducer).total_one_direction


def kept_for_gmacs(model, gmacs: float) -> int:
    """The most tokens summed over blocks whose MACs, merge overhead left out, stay within `gmacs`."""
    report = flops(model)
    return math.floor((gmacs * GIGA - report.patch_embed - report.head) / token_macs(model) + 1e-9)


def gmacs_budget(model, gmacs: float, methods: Sequence[str]) -> int:
    """The tokens summed over blocks a budget of `gmacs` allows (merge overhead left out: tune fits the
    chosen method's schedule with it); a ValueError when the budget is not a number, is not below the dense
    model's GMACs, or is below the cheapest schedule of every method (each block's step as large as the
    method can take)."""
    if not isinstance(gmacs, numbers.Real) or isinstance(gmacs, bool) or not math.isfinite(gmacs):
        raise ValueError(f"gmacs must be a number (GMACs per input), got {gmacs!r}")
    dense = dense_gmacs(model)
    if gmacs >= dense:
        raise ValueError(f"gmacs={gmacs:g} is not below the dense model's {dense:.4g} GMACs (one scan direction): "
                         f"nothing would be removed; give a budget below {dense:.4g}")
    cheapest = {m: schedule_macs(model, m, {}, make_reducer(model, m, keep=1e-6, every=1).schedule.removals) / GIGA
                for m in methods}
    least = min(cheapest, key=cheapest.get)
    if gmacs < cheapest[least]:
        raise ValueError(f"gmacs={gmacs:g} is below the cheapest this model reaches: {least} with its default options "
                         f"at {cheapest[least]:.4g} GMACs (one scan direction, merge included; as many tokens leave "
                         f"before every block as it can take); give at least {cheapest[least]:.4g} GMACs")
    return kept_for_gmacs(model, gmacs)


def kept_sum(removals: Sequence[int], initial: int) -> int:
    """Tokens entering each block, summed over the blocks (what MACs and time follow)."""
    return sum(Schedule(tuple(removals)).token_counts(initial))


def fit(removals: Sequence[int], kept: int, initial: int, blocks: Optional[Sequence[int]] = None) -> Optional[List[int]]:
    """`removals` changed by the fewest tokens so that the tokens summed over blocks are exactly `kept`, only
    at `blocks` (default: its own step blocks; a count is lowered only where it is above 0); None when those
    blocks cannot make that sum (a token more before block b removes depth - b, so steps at even distances
    from the end make only even changes) or a count would fall below 0. The method's capacity is not
    checked here."""
    depth = len(removals)
    blocks = [b for b, r in enumerate(removals) if r] if blocks is None else list(blocks)
    changes = [(b, 1) for b in blocks] + [(b, -1) for b in blocks if removals[b]]
    gap = kept_sum(removals, initial) - kept  # token-layers still to remove (< 0: to give back)
    if not changes:
        return None
    bound = abs(gap) + depth
    parent = {0: None}
    queue = deque([0])
    while queue and gap not in parent:  # fewest single-token changes whose weights add up to the gap
        here = queue.popleft()
        for b, sign in changes:
            there = here + sign * (depth - b)
            if abs(there) <= bound and there not in parent:
                parent[there] = (here, b, sign)
                queue.append(there)
    if gap not in parent:
        return None
    out, node = list(removals), gap
    while parent[node] is not None:
        node, b, sign = parent[node]
        out[b] += sign
    return out if min(out) >= 0 else None
