"""Budgets of mambamerge.tune met exactly: a GMACs budget as the tokens summed over blocks it allows, and a
schedule refitted, at its own step blocks or at any, to an exact sum of tokens over blocks.

GMACs here are those of every GMACs column of mambamerge: one scan direction (the literature's
"GFLOPs", mambamerge.flops' total_one_direction), the method's merge overhead included. Every block
costs the same per token, so the MACs of a schedule are fixed + token_macs * (tokens summed over blocks)
+ its merge overhead."""
import math
import numbers
from typing import Iterator, List, Optional, Sequence

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


def fits(removals: Sequence[int], kept: int, initial: int, blocks: Optional[Sequence[int]] = None,
         extra: int = 1) -> Iterator[List[int]]:
    """`removals` changed so that the tokens summed over blocks are exactly `kept`, only at `blocks`
    (default: its own step blocks; a count is lowered only where it is above 0): every such schedule of
    the fewest single-token changes, then of up to `extra` more, in that order; none when those blocks
    cannot make that sum (a token more before block b removes depth - b, so steps at even distances from
    the end make only even changes). The method's capacity is not checked here: the caller takes the
    first its method accepts."""
    depth = len(removals)
    blocks = [b for b, r in enumerate(removals) if r] if blocks is None else sorted(blocks)
    changes = [(b, 1) for b in blocks] + [(b, -1) for b in blocks if removals[b]]
    gap = kept_sum(removals, initial) - kept  # token-layers still to remove (< 0: to give back)
    fewest = _fewest_changes([sign * (depth - b) for b, sign in changes], gap, depth)
    if fewest is None:
        return
    widest = max(depth - b for b, _ in changes)

    def combos(first: int, left: int, rest: int, out: List[int]) -> Iterator[List[int]]:
        if left == 0:
            if rest == 0:
                yield list(out)
            return
        if abs(rest) > left * widest:
            return
        for i in range(first, len(changes)):
            b, sign = changes[i]
            if (out[b] - removals[b]) * sign < 0 or out[b] + sign < 0:  # not both ways at b, never below 0
                continue
            out[b] += sign
            yield from combos(i, left - 1, rest - sign * (depth - b), out)
            out[b] -= sign

    for count in range(fewest, fewest + extra + 1):
        yield from combos(0, count, gap, list(removals))


def _fewest_changes(weights: Sequence[int], gap: int, depth: int) -> Optional[int]:
    """The fewest of `weights` (repeats allowed) that add up to `gap`; None when none do."""
    bound = abs(gap) + depth
    seen, frontier, count = {0}, [0], 0
    while frontier and gap not in seen:  # breadth first over the sums reached
        count += 1
        reached = []
        for here in frontier:
            for w in weights:
                there = here + w
                if abs(there) <= bound and there not in seen:
                    seen.add(there)
                    reached.append(there)
        frontier = reached
    return count if gap in seen else None
