"""`tune(model, inputs, reduction)`: the method, options and per-block schedule that keep the most of the
dense model at a fixed average reduction, found on the user's own (unlabelled) inputs.

Score: the mean KL divergence of the patched prediction from the dense one (dense logits computed once);
with labels, top-1 first and KL to break ties. Search: every method's `search_space()` screened on a
slice of the inputs, the best few rescored on all of them (successive halving), then the best one's
schedule moved between blocks by coordinate descent under the exact same token budget."""
import copy
import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from mambamerge.atomic import write_bytes
from mambamerge.flops import flops
from mambamerge.merge import METHODS
from mambamerge.merge.recipe import MergeRecipe
from mambamerge.merge.schedule import Schedule
from mambamerge.patch import make_reducer

DEFAULT_METHODS = ("mame", "stm", "tome")


@dataclass
class TuneResult:
    """config: the chosen configuration (plain JSON values; `mambamerge.patch(model, config=config)`
    applies it); candidates: every candidate scored, in the order tried, each a plain dict."""

    config: dict
    candidates: List[dict]


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


def tune(model, inputs: torch.Tensor, reduction: float, labels: Optional[torch.Tensor] = None,
         methods: Optional[Sequence[str]] = None, max_candidates: int = 100, time_budget_s: Optional[float] = None,
         seed: int = 0, screen: int = 64, keep: int = 3, batch_size: int = 32,
         journal: Optional[Path] = None, on_candidate: Optional[Callable[[dict], None]] = None) -> TuneResult:
    """Find the reduction of `model` (a mambamerge model; left as it was) at average `reduction` that
    keeps its predictions on `inputs` (N, *model.input_shape) closest to the dense model's.

    labels: (N,) class indices; then top-1 ranks first, KL breaks ties. methods: names in METHODS
    (default mame, stm, tome). max_candidates / time_budget_s: stop searching after that many scored
    candidates / seconds (the best so far is returned). seed: which option combinations are screened
    when there are more than max_candidates. screen: inputs of the first, cheap pass; keep: how many of
    its best are rescored on all inputs. journal: a JSON file of scored candidates, written atomically
    after each one, so that a tune killed and rerun with the same arguments continues where it was.
    on_candidate: called with each candidate's record once scored (or read back from the journal)."""
    methods = list(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(METHODS))}")
    if labels is not None and len(labels) != len(inputs):
        raise ValueError(f"{len(labels)} labels for {len(inputs)} inputs: give one label per input")
    if len(inputs) == 0:
        raise ValueError("tune needs at least one calibration input")
    work = copy.deepcopy(model).eval()
    work.token_reducer = None
    dense = _logits(work, inputs, batch_size)
    done = json.loads(Path(journal).read_text()) if journal is not None and Path(journal).exists() else {}
    candidates: List[dict] = []
    start = time.monotonic()

    def out_of_budget(limit: int = max_candidates) -> bool:
        over_time = time_budget_s is not None and time.monotonic() - start > time_budget_s
        return len(candidates) >= limit or over_time

    def evaluate(method: str, options: dict, removals: Optional[Sequence[int]], n: int, stage: str) -> dict:
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
                      "reduction": reducer.schedule.average_reduction(work.layout.length), "gmacs": macs / 1e9,
                      "inputs": n, "kl": kl_to_dense(dense[:n], logits).mean().item()}
            if labels is not None:
                record["top1"] = (logits.argmax(-1) == labels[:n]).double().mean().item()
            done[key] = record
            if journal is not None:
                write_bytes(journal, json.dumps(done))
        record = dict(record, stage=stage)
        candidates.append(record)
        if on_candidate is not None:
            on_candidate(record)
        return record

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
    for method, options in defaults + rest:  # half the budget screens, the rest refines and moves the schedule
        if screened and out_of_budget(max(len(defaults), max_candidates // 2)):
            break
        screened.append(evaluate(method, options, None, n_screen, "screen"))
    best = [evaluate(r["method"], r["options"], None, len(inputs), "refine")
            for r in sorted(screened, key=_score)[:keep]]
    champion = min(best, key=_score)
    step = max(1, max(champion["removals"]) // 4)
    while not out_of_budget() and step >= 1:
        improved = False
        for removals in _moves(champion["removals"], step):
            if out_of_budget():
                break
            if not _valid(work, champion["method"], champion["options"], removals):
                continue
            record = evaluate(champion["method"], champion["options"], removals, len(inputs), "schedule")
            if _score(record) < _score(champion):
                champion, improved = record, True
                break
        if not improved:
            step //= 2
    config = {"method": champion["method"], "options": _full_options(champion),
              "removals": champion["removals"], "reduction": champion["reduction"], "gmacs": champion["gmacs"],
              "score": {k: champion[k] for k in ("kl", "top1") if k in champion},
              "model": type(model).__name__, "depth": len(model.layers), "tokens": model.layout.length,
              "input_shape": list(model.input_shape)}
    return TuneResult(config, candidates)


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
