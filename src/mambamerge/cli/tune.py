"""`mambamerge tune`: the method, options and per-block schedule that keep the most of the dense model at
each target reduction or GMACs budget, found on held-out inputs of the user's data (mambamerge.tune);
writes DIR/config_<R>.json per reduction (config_gmacs_<G>.json per budget), DIR/tune.md, tune.csv,
tune.json and tune.png, all at the end."""
import argparse
import csv
import hashlib
import io
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from mambamerge.cli.inputs import open_data
from mambamerge.cli.options import (add_device_options, check_at_least_one, check_method, check_reduction,
                                    compile_line, default_workers, setup_device)
from mambamerge.dataspec import DataSpec

HELP = ("find the method, options and per-block schedule that keep the most of the dense model at a reduction "
        "or GMACs budget, on your own (unlabelled) inputs")
EXAMPLES = ("--checkpoint model.safetensors --data fashion-mnist --reduction 0.6 0.8 --out outputs/tune",
            "--checkpoint aum.safetensors --data fsdd --limit 300 --reduction 0.6 --methods mame stm --out outputs/tune",
            "--checkpoint model.safetensors --data fashion-mnist --gmacs 0.02 0.0125 --out outputs/tune-gmacs",
            "--checkpoint vim_s.pth --data imagenet/train_subset --reduction 0.5 --device cuda --out outputs/tune-s")
CSV_FIELDS = ("target_reduction", "target_gmacs", "stage", "method", "options", "removals", "reduction", "gmacs",
              "inputs", "kl", "top1")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model checkpoint (.safetensors or .pth)")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="as for eval: a named data set or a folder <folder>/<class name>/<inputs>; tune calibrates "
                        "on it, so give held-out training inputs, never the inputs you report on")
    p.add_argument("--split", help="split of a named set (default: val for fsdd and moving-*, else train); the test "
                                   "split is refused unless --allow-test-split")
    p.add_argument("--allow-test-split", action="store_true",
                   help="calibrate on the test split anyway (its numbers are then no longer held out)")
    p.add_argument("--limit", type=int, default=500, metavar="N",
                   help="calibration inputs, class-stratified as everywhere (default: 500)")
    p.add_argument("--img-size", type=int, metavar="PIXELS", help="resolution (default: the checkpoint's)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--reduction", nargs="+", type=float, metavar="R",
                        help="target average reductions in (0, 1), one tune each")
    budget.add_argument("--gmacs", nargs="+", type=float, metavar="G",
                        help="instead of --reduction: GMACs budgets per input (one scan direction, merge overhead "
                             "included, as every GMACs column), one tune each; each is met within one block's token "
                             "step and never exceeded")
    p.add_argument("--labels", action="store_true",
                   help="score by top-1 on the inputs' labels first, KL to the dense model breaking ties "
                        "(default: KL alone, no labels needed)")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="methods to search (default: mame stm tome)")
    p.add_argument("--max-candidates", type=int, default=100, metavar="N",
                   help="candidates scored per reduction, at most (default: 100)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop searching a reduction after this long")
    p.add_argument("--seed", type=int, default=0, help="which option combinations are screened first (default: 0)")
    p.add_argument("--batch-size", "--batch", type=int, default=32, metavar="N", help="batch size (default: 32)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores free at start)")
    add_device_options(p)
    p.add_argument("--compile", action="store_true",
                   help="compute the dense reference logits (one pass over the calibration inputs, shared by every "
                        "target) with a torch.compile'd forward (mambamerge.compile; its compile timed apart and "
                        "reported). The candidates stay eager: each is a graph of its own, run once, so compiling "
                        "them would cost more than it saves. On CPU it pays only when that one dense pass takes "
                        "longer than its compile (tens of seconds; docs/api.md)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the results and the journal a rerun continues from (created if needed)")


def calibration_split(args: argparse.Namespace) -> str:
    """The split tune reads: --split, else val where the named set has one, else train; the test split is a
    ValueError unless --allow-test-split."""
    data = DataSpec.parse(args.data)
    split = args.split or ("val" if data.has_val_split else "train")
    if data.named and split == "test" and not args.allow_test_split:
        raise ValueError(f"{args.data}'s test split is for reporting, not for choosing settings: tune on --split "
                         f"{'val' if data.has_val_split else 'train'} (or pass --allow-test-split to calibrate on "
                         f"it anyway)")
    return split


@dataclass(frozen=True)
class Budget:
    """One tune's target: kind "reduction" (an average reduction) or "gmacs" (GMACs per input)."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        """How the reports name it: "60%" or "0.0125 GMACs"."""
        return f"{self.value:.0%}" if self.kind == "reduction" else f"{self.value:g} GMACs"

    @property
    def stem(self) -> str:
        """Its part of the file names: "0.6" or "gmacs_0.0125" (a reduction and a budget never collide)."""
        return f"{self.value:g}" if self.kind == "reduction" else f"gmacs_{self.value:g}"

    def record(self) -> dict:
        """{"target_reduction": R} or {"target_gmacs": G}, as the CSV and JSON give it."""
        return {f"target_{self.kind}": self.value}


def budgets(args: argparse.Namespace) -> List[Budget]:
    """The targets of --reduction or --gmacs in the order given, repeats dropped."""
    kind = "reduction" if args.reduction is not None else "gmacs"
    found = {}
    for value in getattr(args, kind):
        found.setdefault(Budget(kind, value).stem, Budget(kind, value))
    return list(found.values())


def check_args(args: argparse.Namespace) -> None:
    check_at_least_one(args, "limit", "img_size", "threads", "batch_size", "max_candidates")
    for reduction in args.reduction or ():
        check_reduction(reduction)
        if reduction == 0:
            raise ValueError("--reduction 0 leaves every token: there is nothing to tune; give targets in (0, 1)")
    for gmacs in args.gmacs or ():
        if not 0 < gmacs < float("inf"):
            raise ValueError(f"--gmacs must be positive (GMACs per input, one scan direction), got {gmacs}")
    for method in args.methods or ():
        check_method(method, {})
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError(f"--time-budget must be positive, got {args.time_budget}")
    calibration_split(args)


def candidates_csv(results: Dict[Budget, "object"]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for budget, result in results.items():
        for c in result.candidates:
            writer.writerow(dict(c, **budget.record(), options=json.dumps(c["options"], sort_keys=True),
                                 removals=" ".join(map(str, c["removals"]))))
    return out.getvalue()


def summary_table(results: Dict[Budget, "object"], labels: bool) -> str:
    """One markdown row per target: the chosen method, its changed options, the schedule and its score."""
    head = "| target | method | options | removals before each block | reduction | GMACs | KL to dense |"
    head += " top-1 |" if labels else ""
    lines = [head, "|" + "---|" * (8 if labels else 7)]
    for budget, result in results.items():
        c = result.config
        defaults = _defaults(c["method"])
        changed = {k: v for k, v in c["options"].items() if defaults.get(k) != v}
        row = (f"| {budget.label} | {c['method']} | {json.dumps(changed, sort_keys=True) if changed else 'defaults'} | "
               f"{' '.join(map(str, c['removals']))} | {c['reduction']:.1%} | {c['gmacs']:.4g} | "
               f"{c['score']['kl']:.4g} |")
        lines.append(row + (f" {c['score']['top1']:.2%} |" if labels else ""))
    return "\n".join(lines) + "\n"


def candidates_table(results: Dict[Budget, "object"], labels: bool) -> str:
    """Every candidate of every target, in the order scored, as markdown."""
    head = "| target | stage | method | options | removals before each block | inputs | GMACs | KL to dense |"
    lines = [head + (" top-1 |" if labels else ""), "|" + "---|" * (9 if labels else 8)]
    for budget, result in results.items():
        for c in result.candidates:
            row = (f"| {budget.label} | {c['stage']} | {c['method']} | {json.dumps(c['options'], sort_keys=True)} | "
                   f"{' '.join(map(str, c['removals']))} | {c['inputs']} | {c['gmacs']:.4g} | {c['kl']:.4g} |")
            lines.append(row + (f" {c['top1']:.2%} |" if labels else ""))
    return "\n".join(lines) + "\n"


def times_text(reference, seconds: Dict[Budget, float]) -> str:
    """The report's timing lines: the dense reference pass (and its compile, apart), then each target's
    search in this run (a tune continued from its journal rescored only what it had not)."""
    how = "torch.compile'd" if reference.compile_s else "eager"
    lines = [f"- dense reference: {reference.seconds:.1f} s ({how}; once for every target)"]
    if reference.compile_s:
        lines.append(f"- compile: {compile_line(reference.compile_s)}")
    lines += [f"- tune {budget.label}: {s:.1f} s" for budget, s in seconds.items()]
    return "\n".join(lines) + "\n"


def _defaults(method: str) -> dict:
    from mambamerge.merge import METHODS

    return METHODS[method].options()


def run(args: argparse.Namespace) -> int:
    """The tune, holding --out's lock all along (atomic.hold): a second tune into it is refused at once."""
    from mambamerge.atomic import hold
    from mambamerge.distributed import world
    from mambamerge.results import check_writable

    check_args(args)
    out = check_writable(args.out, create=False)
    with hold(out, "mambamerge tune") if world().is_main else nullcontext(out):
        return _tune(args, out)


def _inputs(dataset, labels: bool, batch_size: int, workers: int):
    """(N, *input_shape) inputs and (N,) labels (None unless asked for) of the whole dataset, decoded by
    `workers` DataLoader processes."""
    import torch
    from torch.utils.data import DataLoader

    batches = list(DataLoader(dataset, batch_size=batch_size, num_workers=workers))
    inputs = torch.cat([x for x, _ in batches])
    return inputs, (torch.cat([torch.as_tensor(y) for _, y in batches]).long() if labels else None)


def journal_name(args: argparse.Namespace, split: str, budget: Budget) -> str:
    """The journal of one target's scores, named by everything the scores depend on (the checkpoint file,
    the inputs, labels, batch size, device, precision and whether the dense reference was compiled): a
    rerun with the same arguments continues from it, one with other inputs or another checkpoint starts
    afresh instead of reusing stale scores."""
    checkpoint = Path(args.checkpoint).resolve()
    stat = checkpoint.stat()
    key = [str(checkpoint), stat.st_size, stat.st_mtime_ns, args.data, split, args.limit, args.img_size,
           args.labels, args.batch_size, args.device, args.amp, args.compile]
    return f"journal_{budget.stem}_{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]}.json"


def _tune(args: argparse.Namespace, out: Path) -> int:
    import torch

    from mambamerge.atomic import write_files
    from mambamerge.data import subset_record
    from mambamerge.devices import autocast
    from mambamerge.plots import tune_png
    from mambamerge.progress import progress
    from mambamerge.results import environment, json_text
    from mambamerge.threads import default_threads
    from mambamerge.tune import DEFAULT_METHODS, reference_logits, tune

    torch.set_num_threads(default_threads(args.threads))
    device = setup_device(args)
    split = calibration_split(args)
    model, dataset, label = open_data(args, default_split=split, limit=args.limit, suggest_test=False)
    model = model.to(device)
    inputs, labels = _inputs(dataset, args.labels, args.batch_size, default_workers(args.workers))
    inputs = inputs.to(device)
    labels = None if labels is None else labels.to(device)
    methods = list(args.methods or DEFAULT_METHODS)
    with autocast(device, args.amp):
        reference = reference_logits(model, inputs, args.batch_size, compile=args.compile)
    results, seconds = {}, {}
    for budget in budgets(args):
        with progress(total=args.max_candidates, desc=f"tune {budget.label}", unit="candidates", leave=True) as bar:
            def scored(record, bar=bar):
                bar.finished(f"{record['method']} ({record['stage']}): KL {record['kl']:.4g}")
            start = time.monotonic()
            with autocast(device, args.amp):
                results[budget] = tune(model, inputs, labels=labels, methods=methods,
                                       max_candidates=args.max_candidates, time_budget_s=args.time_budget,
                                       seed=args.seed, batch_size=args.batch_size, dense_logits=reference.logits,
                                       journal=out / journal_name(args, split, budget), on_candidate=scored,
                                       **{budget.kind: budget.value})
            seconds[budget] = time.monotonic() - start
    kind = model.input_kind
    targets = ", ".join(b.label for b in results)
    title = f"{Path(args.checkpoint).name} tuned on {label} ({len(inputs)} {kind}) at {targets}"
    table = summary_table(results, args.labels)
    times = times_text(reference, seconds)
    payload = {"checkpoint": str(args.checkpoint), "data": {"spec": args.data, "label": label, "split": split,
                                                            "inputs": len(inputs), **subset_record(args.limit)},
               "settings": {"methods": methods, "labels": args.labels, "max_candidates": args.max_candidates,
                            "time_budget_s": args.time_budget, "seed": args.seed, "compile": args.compile},
               "environment": environment(device),
               "dense_reference": {"seconds": reference.seconds, "compiled": args.compile,
                                   "compile_s": reference.compile_s},
               "tunes": [{**b.record(), "seconds": seconds[b], "config": r.config, "candidates": r.candidates}
                         for b, r in results.items()]}
    files = {f"config_{b.stem}.json": json_text(r.config) for b, r in results.items()}
    files.update({"tune.md": f"# {title}\n\n## Chosen\n\n{table}\n## Time\n\n{times}\n## Every candidate\n\n"
                             f"{candidates_table(results, args.labels)}", "tune.csv": candidates_csv(results),
                  "tune.json": json_text(payload), "tune.png": tune_png(results, title)})
    write_files(out, files)
    print(table, end="")
    print(f"\n{times}", end="")
    print(f"\nconfigs: {', '.join(str(out / name) for name in files if name.startswith('config_'))}\n"
          f"results: {out / 'tune.md'}, tune.csv, tune.json, tune.png\n"
          f"apply:   mambamerge.patch(model, config=json.load(open(...))) or eval --config FILE")
    return 0
