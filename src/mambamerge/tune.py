"""`tune(model, inputs, reduction | gmacs)`: the method, options and per-block schedule that keep the most of
the dense model at a fixed average reduction or GMACs budget, found on the user's own (unlabelled) inputs.

Score: the mean KL divergence of the patched prediction from the dense one (dense logits computed once);
with labels, top-1 first and KL to break ties. Search: every method's `search_space()` screened on a
slice of the inputs, the best few rescored on all of them (successive halving), then the best one's
schedule: its own refitted to exactly the budget's tokens summed over blocks, then where the steps start
and how often (each spacing refitted alike), then the best of these schedules' removals moved between
blocks by coordinate descent under the same exact budget."""
import copy
import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from mambamerge.atomic import write_bytes
from mambamerge.budget import GIGA, fits, gmacs_budget, schedule_macs, token_macs
from mambamerge.flops import flops
from mambamerge.merge import METHODS
from mambamerge.merge.recipe import MergeRecipe
from mambamerge.merge.schedule import Schedule
from mambamerge.patch import make_reducer
from mambamerge.timing import first_call_seconds, time_call

DEFAULT_METHODS = ("mame", "stm", "tome")
# where the schedule's steps start and how often, tried in this order: the tuner's first schedules
# (geometric from block 1, every second block or every block), then later starts and sparser steps
SPACINGS = ((1, 2), (1, 1)) + tuple((s, e) for s in (1, 2, 3, 4) for e in (1, 2, 3) if (s, e) not in ((1, 2), (1, 1)))


@dataclass
class TuneResult:
    """config: the chosen configuration (plain JSON values; `mambamerge.patch(model, config=config)`
    applies it); candidates: every candidate scored, in the order tried, each a plain dict."""

    config: dict
    candidates: List[dict]


class Reference(NamedTuple):
    """The dense model's predictions that every candidate is scored against. logits: (N, C); seconds: the
    pass over the inputs (a compile excluded); compile_s: {"dense": seconds of the first, compiling call}
    when the forward was torch.compile'd, else None."""

    logits: torch.Tensor
    seconds: float
    compile_s: Optional[Dict[str, float]]


def reference_logits(model, inputs: torch.Tensor, batch_size: int = 32, compile: bool = False) -> Reference:
    """`model` run dense (a copy in eval mode; `model` is left as it was) on `inputs` (N, *input_shape).
    compile: through mambamerge.compile, one graph for every batch (a short last batch is padded with the
    first inputs, so that it reuses the graph instead of compiling another); its first call, the compile,
    is timed apart."""
    work = copy.deepcopy(model).eval()
    work.token_reducer = None
    forward, padded = work, inputs
    if compile:
        from mambamerge.compiling import compile as compile_model

        forward = compile_model(work)
        if len(inputs) > batch_size:
            short = -len(inputs) % batch_size  # the inputs the last batch lacks
            padded = torch.cat([inputs, inputs[:short]])
    compile_s = None
    if compile:
        with torch.no_grad():
            compile_s = first_call_seconds({"dense": lambda: forward(padded[:batch_size])}, inputs.device)
    out: List[torch.Tensor] = []
    seconds = time_call(lambda: out.append(_logits(forward, padded, batch_size)), inputs.device, warmup=0, runs=1)[0]
    return Reference(out[0][:len(inputs)], seconds, compile_s)


def kl_to_dense(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(N, C) x2 -> (N,): KL(softmax(dense) || softmax(logits)) per input, in nats."""
    p_log = F.log_softmax(dense_logits.double(), dim=-1)
    q_log = F.log_softmax(logits.double(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1)


def _logits(model, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(inputs[i:i + batch_size]).float() for i in range(0, len(inputs), batch_size)])


def _score(record: dict) -> tuple:
    """Sort key, lower is better: (-top1, kl) with labels, (kl,) without."""
    return (-record["top1"], record["kl"]) if "top1" in record else (record["kl"],)


def _moves(removals: Sequence[int], step: int) -> List[tuple]:
    """Schedules of the same total tokens: `step` tokens leave one block later at block i and `step`
    tokens leave one block earlier at block k (sum over blocks of tokens kept is unchanged)."""
    depth, out = len(removals), []
    for i, k in itertools.permutations(range(1, depth), 2):
        if removals[i] < step or removals[k] < step or i + 1 >= depth or k - 1 < 1:
            continue
        new = list(removals)
        new[i] -= step
        new[i + 1] += step
        new[k] -= step
        new[k - 1] += step
        if new != list(removals):
            out.append(tuple(new))
    return out


def tune(model, inputs: torch.Tensor, reduction: Optional[float] = None, labels: Optional[torch.Tensor] = None,
         methods: Optional[Sequence[str]] = None, max_candidates: int = 100, time_budget_s: Optional[float] = None,
         seed: int = 0, screen: int = 64, keep: int = 3, batch_size: int = 32,
         journal: Optional[Path] = None, on_candidate: Optional[Callable[[dict], None]] = None,
         gmacs: Optional[float] = None, dense_logits: Optional[torch.Tensor] = None) -> TuneResult:
    """Find the reduction of `model` (a mambamerge model; left as it was) at average `reduction`, or within
    `gmacs` GMACs per input, that keeps its predictions on `inputs` (N, *model.input_shape) closest to the
    dense model's.

    reduction / gmacs: the budget, exactly one of them. The schedule stages keep the tokens summed over
    blocks at exactly what it allows: round((1 - reduction) * depth * tokens), or for gmacs (one scan
    direction, merge overhead included, as every GMACs column) the most whose GMACs stay within the budget,
    less than one block's token step below it; a budget not below the dense GMACs or below the cheapest
    reachable is a ValueError. labels: (N,) class indices; then top-1 ranks first, KL breaks ties.
    methods: names in METHODS (default mame, stm, tome). max_candidates / time_budget_s: stop searching
    after that many scored candidates / seconds (the best so far is returned). seed: which option
    combinations are screened when there are more than max_candidates. screen: inputs of the first, cheap
    pass; keep: how many of its best are rescored on all inputs. journal: a JSON file of scored
    candidates, written atomically after each one, so that a tune killed and rerun with the same
    arguments continues where it was. on_candidate: called with each candidate's record once scored (or
    read back from the journal). dense_logits: (N, C) the dense model's logits on `inputs` when computed
    already (reference_logits: once for several budgets, or compiled), else computed here."""
    if (reduction is None) == (gmacs is None):
        raise ValueError("give exactly one budget: reduction= (an average reduction, e.g. 0.6) or gmacs= (GMACs "
                         "per input, one scan direction)")
    methods = list(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(METHODS))}")
    if labels is not None and len(labels) != len(inputs):
        raise ValueError(f"{len(labels)} labels for {len(inputs)} inputs: give one label per input")
    if len(inputs) == 0:
        raise ValueError("tune needs at least one calibration input")
    if dense_logits is not None and (dense_logits.dim() != 2 or len(dense_logits) != len(inputs)):
        raise ValueError(f"dense_logits must be (N, classes) for the {len(inputs)} inputs, got "
                         f"{tuple(dense_logits.shape)}: pass reference_logits(model, inputs).logits")
    work = copy.deepcopy(model).eval()
    work.token_reducer = None
    depth, initial = len(work.layers), work.layout.length
    if gmacs is not None:
        kept = gmacs_budget(work, gmacs, methods)
        reduction = 1.0 - kept / (depth * initial)
    else:
        kept = round((1.0 - reduction) * depth * initial)
    step = token_macs(work)
    dense = (reference_logits(work, inputs, batch_size).logits if dense_logits is None else dense_logits).float()
    done = json.loads(Path(journal).read_text()) if journal is not None and Path(journal).exists() else {}
    candidates: List[dict] = []
    start = time.monotonic()

    def out_of_budget(limit: int = max_candidates) -> bool:
        over_time = time_budget_s is not None and time.monotonic() - start > time_budget_s
        return len(candidates) >= limit or over_time

    def evaluate(method: str, options: dict, removals: Optional[Sequence[int]], n: int, stage: str,
                 **spacing) -> dict:
        key = json.dumps([method, options, list(removals) if removals is not None else None, n], sort_keys=True)
        if key in done:
            record = done[key]
        else:
            schedule = list(removals) if removals is not None else None
            reducer = make_reducer(work, method, reduction if schedule is None else None, schedule, **options)
            work.token_reducer = reducer
            try:
                logits = _logits(work, inputs[:n], batch_size)
                macs = flops(work).total_one_direction
            finally:
                work.token_reducer = None
            record = {"method": method, "options": options, "removals": list(reducer.schedule.removals),
                      "reduction": reducer.schedule.average_reduction(work.layout.length), "gmacs": macs / GIGA,
                      "inputs": n, "kl": kl_to_dense(dense[:n], logits).mean().item()}
            if labels is not None:
                record["top1"] = (logits.argmax(-1) == labels[:n]).double().mean().item()
            done[key] = record
            if journal is not None:
                write_bytes(journal, json.dumps(done))
        record = dict(record, stage=stage, **spacing)
        candidates.append(record)
        if on_candidate is not None:
            on_candidate(record)
        return record

    def within_gmacs(method: str, options: dict, removals: Sequence[int]) -> bool:
        """Within the GMACs budget and less than one block's token step below it (always, for a reduction)."""
        return gmacs is None or -step < schedule_macs(work, method, options, removals) - gmacs * GIGA <= 0

    def refitted(method: str, options: dict, base: Sequence[int],
                 blocks: Optional[Sequence[int]] = None) -> Optional[List[int]]:
        """`base` refitted to the budget exactly at `blocks` (default its own step blocks): the first of the
        fewest-change fits the method accepts, None where none does; `kept` tokens over blocks, less by the
        merge overhead's worth for a GMACs budget."""
        target = kept
        for _ in range(8):  # the overhead changes a little with the tokens kept: a few rounds settle it
            accepted = (r for r in itertools.islice(fits(base, target, initial, blocks), 64)
                        if _valid(work, method, options, r))
            removals = next(accepted, None)
            if removals is None:
                return None
            if gmacs is None:
                return removals
            over = schedule_macs(work, method, options, removals) - gmacs * GIGA
            if -step < over <= 0:
                return removals
            target += -math.ceil(over / step) if over > 0 else math.floor(-over / step)
        return None

    def fitted(method: str, options: dict, first: int, every: int) -> Optional[List[int]]:
        """The geometric schedule stepping before blocks first, first + every, ... refitted to the budget."""
        try:
            base = make_reducer(work, method, reduction, start=first, every=every, **options).schedule.removals
        except ValueError:
            return None
        return refitted(method, options, base)

    def spacings(record: dict) -> List[dict]:
        """The record's own schedule refitted to the budget at any block from 1, then the spacings of its
        method and options that meet the budget exactly, scored (up to half the candidates left: the rest
        moves the best one's removals)."""
        out, tried = [], set()
        limit = len(candidates) + max(1, (max_candidates - len(candidates)) // 2)
        own = refitted(record["method"], record["options"], record["removals"], range(1, depth))
        if own is not None:
            tried.add(tuple(own))
            out.append(evaluate(record["method"], record["options"], own, len(inputs), "refit"))
        for first, every in SPACINGS:
            if first >= depth or (out and out_of_budget(limit)):
                continue
            removals = fitted(record["method"], record["options"], first, every)
            if removals is None or tuple(removals) in tried:
                continue
            tried.add(tuple(removals))
            out.append(evaluate(record["method"], record["options"], removals, len(inputs), "spacing",
                                start=first, every=every))
        return out

    grid = [(m, dict(zip(space, values))) for m in methods
            for space in [METHODS[m].search_space(work.layout)] for values in itertools.product(*space.values())]
    grid = [(m, opts) for m, opts in grid if _reachable(work, m, reduction, opts)]
    if not grid:
        raise ValueError(f"none of {', '.join(methods)} can reach an average reduction of {reduction:.0%} on this "
                         f"model; choose a smaller reduction")
    defaults = [(m, {}) for m in methods if _reachable(work, m, reduction, {})]
    rest = [g for g in grid if g[1] != {k: METHODS[g[0]].options()[k] for k in g[1]}]
    random.Random(seed).shuffle(rest)
    n_screen = min(screen, len(inputs))
    screened = []
    for method, options in defaults + rest:  # half the budget screens, the rest refines and searches the schedule
        if screened and out_of_budget(max(len(defaults), max_candidates // 2)):
            break
        screened.append(evaluate(method, options, None, n_screen, "screen"))
    best = sorted((evaluate(r["method"], r["options"], None, len(inputs), "refine")
                   for r in sorted(screened, key=_score)[:keep]), key=_score)
    exact = next((found for found in map(spacings, best) if found), [])
    if not exact and gmacs is not None:
        raise ValueError(f"no schedule of {', '.join(dict.fromkeys(r['method'] for r in best))} meets gmacs={gmacs:g} "
                         f"to within one block's token step; give a larger budget")
    champion = min(exact, key=_score) if exact else best[0]
    seen = {tuple(c["removals"]) for c in exact}  # scored already, and none better than the champion
    moved = max(1, max(champion["removals"]) // 4)
    while not out_of_budget() and moved >= 1:
        improved = False
        for removals in _moves(champion["removals"], moved):
            if out_of_budget():
                break
            if removals in seen or not (_valid(work, champion["method"], champion["options"], removals)
                                        and within_gmacs(champion["method"], champion["options"], removals)):
                continue
            seen.add(removals)
            record = evaluate(champion["method"], champion["options"], removals, len(inputs), "schedule",
                              **_spacing(champion))
            if _score(record) < _score(champion):
                champion, improved = record, True
                break
        if not improved:
            moved //= 2
    config = {"method": champion["method"], "options": _full_options(champion),
              "removals": champion["removals"], "reduction": champion["reduction"], "gmacs": champion["gmacs"],
              "budget": {"reduction": reduction} if gmacs is None else {"gmacs": gmacs},
              "spacing": _spacing(champion) or None,
              "score": {k: champion[k] for k in ("kl", "top1") if k in champion},
              "model": type(model).__name__, "depth": len(model.layers), "tokens": model.layout.length,
              "input_shape": list(model.input_shape)}
    return TuneResult(config, candidates)


def _spacing(record: dict) -> dict:
    """{start, every} of the spacing the record's schedule was fitted from ({} for a geometric one as
    resolved for the target)."""
    return {k: record[k] for k in ("start", "every") if k in record}


def _full_options(record: dict) -> dict:
    """Every option of the record's method as it ran (defaults filled in)."""
    return {**METHODS[record["method"]].options(), **record["options"]}


def _reachable(model, method: str, reduction: float, options: dict) -> bool:
    try:
        make_reducer(model, method, reduction, **options)
    except ValueError:
        return False
    return True


def _valid(model, method: str, options: dict, removals: Sequence[int]) -> bool:
    try:
        make_reducer(model, method, schedule=list(removals), **options)
    except ValueError:
        return False
    return True


def recipe_of_config(config: dict, model) -> MergeRecipe:
    """The MergeRecipe a tune config describes, for `model`; a ValueError when the config is malformed or
    was tuned for a model of another depth or token count."""
    if not isinstance(config, dict) or not {"method", "options", "removals", "depth", "tokens"} <= set(config):
        raise ValueError("a tune config is a dict with at least method, options, removals, depth and tokens "
                         "(what mambamerge.tune returns as result.config)")
    depth, tokens = len(model.layers), model.layout.length
    if (config["depth"], config["tokens"]) != (depth, tokens):
        raise ValueError(f"the config was tuned for {config.get('model', 'a model')} of {config['depth']} blocks and "
                         f"{config['tokens']} tokens, but this model has {depth} blocks and {tokens} tokens: tune "
                         f"this model (mambamerge.tune) or use a method by name")
    recipe = MergeRecipe.from_json(json.dumps({k: config[k] for k in ("method", "options", "removals", "tokens")}))
    if len(recipe.removals) != depth or not math.isclose(Schedule(recipe.removals).average_reduction(tokens),
                                                         config.get("reduction", recipe.average_reduction())):
        raise ValueError("the config's removals do not match its depth or reduction: it was edited; tune again")
    return recipe
