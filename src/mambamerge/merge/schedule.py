"""How many tokens leave before each block.

A schedule is a tuple `removals` of length depth: removals[l] tokens are removed just before block l
(0-based), using what block l-1 reported, so removals[0] is always 0. Counts are the same for every
image, so token counts, FLOPs and the achieved reduction are known before anything runs.

Reduction is reported two ways: the average reduction over token-layers (what FLOPs and time
follow: 1 - sum_l L_l / (depth * L_0)) and the final token count.
With R-MeeTo's schedule (r tokens before blocks 2, 4, ..., 22 of 24) the average reduction is
5.5 r / 197; reaching 50-80% needs merging from block 1 with a geometric keep ratio.
"""
import numbers
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

Capacity = Callable[[int], int]  # tokens now -> most tokens the method can remove at one step
# A step costs about 1 ms at batch 8 on a 2-core CPU whatever it removes; stepping every second block
# halves that overhead and still reaches 80% average reduction under ToMe's 50%-per-step limit.
DEFAULT_GEOMETRIC_EVERY = 2


class UnreachableTarget(ValueError):
    """A target average reduction a schedule cannot reach with a method, with the parts of the message
    apart: `schedule` (its kind and spacing in words), `target`, `reached` (the closest), `most` (the
    most it can reach) and `advice`, so that a sweep can say it once for many targets."""

    def __init__(self, schedule: str, target: float, reached: float, most: float, advice: str):
        super().__init__(f"{schedule} cannot reach an average reduction of {_percent(target)} with this method: the "
                         f"closest is {reached:.1%}, the most it can reach {most:.1%}; {advice}")
        self.schedule, self.target, self.reached, self.most, self.advice = schedule, target, reached, most, advice


@dataclass(frozen=True)
class Schedule:
    removals: Tuple[int, ...]

    def token_counts(self, initial: int) -> List[int]:
        """Tokens entering each block."""
        counts, length = [], initial
        for r in self.removals:
            length -= r
            counts.append(length)
        return counts

    def average_reduction(self, initial: int) -> float:
        counts = self.token_counts(initial)
        return 1.0 - sum(counts) / (len(counts) * initial)

    def summary(self, initial: int) -> dict:
        counts = self.token_counts(initial)
        return {"average_reduction": self.average_reduction(initial),
                "average_tokens": sum(counts) / len(counts), "final_tokens": counts[-1],
                "initial_tokens": initial, "token_counts": counts, "removals": list(self.removals)}


def validate(removals: Sequence[int], depth: int, initial: int, capacity: Capacity) -> Schedule:
    """A Schedule from per-block counts, padded with zeros to depth; a ValueError names the first step
    the method cannot take (more tokens than it can remove there) or any malformed count."""
    if any(not _whole(r) for r in removals):
        raise ValueError(f"schedule counts must be whole numbers of tokens, got {list(removals)}")
    removals = [int(r) for r in removals]
    if len(removals) > depth:
        raise ValueError(f"schedule has {len(removals)} entries but the model has only {depth} blocks")
    removals += [0] * (depth - len(removals))
    if any(r < 0 for r in removals):
        raise ValueError(f"schedule counts must be >= 0, got {removals}")
    if removals[0]:
        raise ValueError("nothing can be removed before block 0: methods use what the previous block reports; "
                         "start the schedule at block 1 or later")
    length = initial
    for block, r in enumerate(removals):
        most = capacity(length)
        if r > most:
            raise ValueError(f"schedule asks for {r} tokens before block {block}, but only {most} of the "
                             f"{length} tokens there can be removed by this method")
        length -= r
    return Schedule(tuple(removals))


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_arguments(reduction=None, r=None, keep=None, start=None, every=None) -> None:
    """Type and range errors in the user's schedule arguments as ValueErrors naming them (a count of 2.7
    tokens is not rounded, a reduction given as text is not compared, every=0 is not a schedule), checked
    whatever the schedule, so that an argument the schedule would not use is never silently ignored."""
    for name, value in (("reduction", reduction), ("keep", keep)):
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool)):
            raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    for name, value in (("r", r), ("start", start), ("every", every)):
        if value is not None and not _whole(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if reduction is not None and not 0.0 <= reduction < 1.0:
        raise ValueError(f"reduction must be in [0, 1), got {reduction}")
    if keep is not None and not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
    if r is not None and r < 0:
        raise ValueError(f"r (tokens removed per step) must be 0 or more, got {r}")
    for name, value in (("start", start), ("every", every)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (blocks), got {value}")


def _percent(fraction: float) -> str:
    """A fraction as the percentage it is (0.9999 -> 99.99%, not 100%)."""
    return f"{fraction * 100:.6g}%"


def constant(depth: int, initial: int, capacity: Capacity, r: int, start: int = 2, every: int = 2) -> Schedule:
    """r tokens before blocks start, start + every, ... (R-MeeTo: start=2, every=2)."""
    if start < 1 or every < 1:
        raise ValueError(f"start must be >= 1 and every >= 1, got start={start}, every={every}")
    return validate([r if (b >= start and (b - start) % every == 0) else 0 for b in range(depth)], depth, initial,
                  capacity)


def geometric(depth: int, initial: int, capacity: Capacity, keep: float, start: int = 1,
              every: int = DEFAULT_GEOMETRIC_EVERY) -> Schedule:
    """Before blocks start, start + every, ...: keep round(keep * L) of the L tokens (at most the method's
    capacity is removed; at least 2 tokens stay: the class token and one more)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
    if start < 1 or every < 1:
        raise ValueError(f"start must be >= 1 and every >= 1, got start={start}, every={every}")
    removals, length = [], initial
    for b in range(depth):
        r = 0
        if b >= start and (b - start) % every == 0:
            r = min(length - max(2, round(keep * length)), capacity(length))
            r = max(r, 0)
        removals.append(r)
        length -= r
    return validate(removals, depth, initial, capacity)


def _closest_constant(make: Callable[[int], Schedule], initial: int, target: float) -> Tuple[Schedule, Schedule]:
    """(schedule closest to target, the one removing most), over every r the method can take."""
    feasible = []
    for r in range(initial):
        try:
            feasible.append(make(r))
        except ValueError:
            break
    best = min(feasible, key=lambda sch: abs(sch.average_reduction(initial) - target))
    return best, feasible[-1]


def _closest_geometric(make: Callable[[float], Schedule], initial: int, target: float) -> Tuple[Schedule, Schedule]:
    """Bisection on the keep ratio (reduction falls as keep grows). Returns (closest, most reducing)."""
    lo, hi = 1e-6, 1.0
    best = make(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        sch = make(mid)
        if abs(sch.average_reduction(initial) - target) < abs(best.average_reduction(initial) - target):
            best = sch
        if sch.average_reduction(initial) > target:
            lo = mid
        else:
            hi = mid
    return best, make(1e-6)


def resolve(depth: int, initial: int, capacity: Capacity, reduction: Optional[float] = None,
            schedule: Union[None, str, Sequence[int], Schedule] = None, r: Optional[int] = None,
            keep: Optional[float] = None, start: Optional[int] = None, every: Optional[int] = None,
            tolerance: float = 0.02) -> Schedule:
    """Turn the user's arguments into a Schedule.

    - schedule=[r_0, r_1, ...]: explicit counts per block (removals[l] before block l).
    - r alone: ToMe's constant schedule, r tokens before every block from block 1 (start=1, every=1
      unless given).
    - schedule="constant": r tokens before blocks start, start+every, ... (R-MeeTo's defaults 2, 2); r
      given, or derived from `reduction`.
    - schedule="geometric" (the default when only `reduction` or `keep` is given): keep ratio per step
      from block start (default 1) every `every` blocks (default 2, or 1 when a target needs steps
      before every block); keep given, or derived from `reduction`.
    - reduction=0 or r=0: no reduction, asked for explicitly.
    Nothing to reduce by (no reduction, r, keep or list), an argument the schedule does not use, and a
    schedule whose steps all fall past the model's depth are ValueErrors: each would run the model dense
    while it is reported as the method. So is a target that cannot be reached; the error names the
    most the schedule can reach.
    """
    check_arguments(reduction, r, keep, start, every)
    if schedule is not None and not isinstance(schedule, str):
        given = [f"{name}=" for name, value in (("r", r), ("keep", keep), ("start", start), ("every", every))
                 if value is not None]
        given = (["a target reduction"] if reduction is not None else []) + given
        if given:
            raise ValueError(f"give either an explicit schedule list or {', '.join(given)}, not both: the list sets "
                             f"every block's count itself")
        removals = schedule.removals if isinstance(schedule, Schedule) else list(schedule)
        return validate(removals, depth, initial, capacity)
    kind = schedule or ("constant" if r is not None else "geometric")
    if kind not in ("constant", "geometric"):
        raise ValueError(f"unknown schedule {kind!r}: use 'constant', 'geometric' or a list of per-block counts")
    if reduction is None and r is None and keep is None:
        raise ValueError("nothing to reduce by: give reduction= (a target, e.g. 0.4), r= (tokens removed before "
                         "every block, as ToMe), keep= (a geometric keep ratio) or a list of per-block counts "
                         "(on the command line: --reduction R or --option r=N)")
    if r is not None and kind == "geometric":
        raise ValueError("r= is the count of a constant schedule; a geometric one takes keep= (or give "
                         "schedule='constant')")
    if keep is not None and kind == "constant":
        raise ValueError("keep= is the ratio of a geometric schedule; a constant one takes r= (or give "
                         "schedule='geometric')")
    if reduction is not None and (r is not None or keep is not None):
        raise ValueError(f"give either a target reduction or {'r' if r is not None else 'keep'}=, not both: "
                         f"each sets the schedule's size")
    if reduction == 0 or r == 0:
        return Schedule((0,) * depth)
    if kind == "constant":
        tome = schedule is None  # r alone: ToMe's habit, a step before every block
        start = start if start is not None else 1 if tome else 2
        every = every if every is not None else 1 if tome else 2
    else:
        start = start if start is not None else 1
    if start >= depth:
        raise ValueError(f"start={start} is past the model's last block: it has {depth} blocks (0 to {depth - 1}), "
                         f"so no step would run and the model would stay dense; give start= from 1 to {depth - 1}")
    sch = _sized(depth, initial, capacity, kind, reduction, r, keep, start, every, tolerance)
    if not any(sch.removals):
        asked = f"r={r}" if r is not None else f"keep={keep}" if keep is not None else f"reduction {_percent(reduction)}"
        raise ValueError(f"a {kind} schedule with {asked} removes no token from this model's {initial} tokens "
                         f"({depth} blocks), so it would run dense; ask for more")
    return sch


def _sized(depth: int, initial: int, capacity: Capacity, kind: str, reduction: Optional[float], r: Optional[int],
           keep: Optional[float], start: int, every: Optional[int], tolerance: float) -> Schedule:
    """The schedule of `kind` with its size given (r, keep) or solved from the target `reduction`."""
    if kind == "constant":
        if r is not None:
            return constant(depth, initial, capacity, r, start, every)
        best, most = _closest_constant(lambda x: constant(depth, initial, capacity, x, start, every), initial,
                                       reduction)
    elif every is None and keep is None:
        # the default spacing, or every block where the target needs it (shallow models, ToMe's limit)
        for spacing in (DEFAULT_GEOMETRIC_EVERY, 1):
            best, most = _closest_geometric(lambda x: geometric(depth, initial, capacity, x, start, spacing),
                                            initial, reduction)
            if abs(best.average_reduction(initial) - reduction) <= tolerance:
                return best
        every = 1
    else:
        every = every if every is not None else DEFAULT_GEOMETRIC_EVERY
        if keep is not None:
            return geometric(depth, initial, capacity, keep, start, every)
        best, most = _closest_geometric(lambda x: geometric(depth, initial, capacity, x, start, every), initial,
                                        reduction)
    reached = best.average_reduction(initial)
    if abs(reached - reduction) > tolerance:
        if kind == "geometric" and start == 1 and every == 1:
            advice = ("lower the target, use a method that can remove more tokens per step, or give an explicit "
                      "list of per-block counts")
        else:
            advice = ("use schedule='geometric' with start=1, every=1 (on the command line: --option "
                      "schedule=geometric --option start=1 --option every=1), or an explicit list of per-block counts")
        raise UnreachableTarget(f"a {kind} schedule (start={start}, every={every})", reduction, reached,
                                most.average_reduction(initial), advice)
    return best
