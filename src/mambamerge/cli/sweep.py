"""`mambamerge sweep`: every method at every target reduction beside the dense model, on one checkpoint
and dataset; writes DIR/results.md, results.csv, results.json and accuracy.png, all at the end."""
import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

from mambamerge.cli.inputs import describe, load_inputs, recorded_merge
from mambamerge.cli.names import METHODS
from mambamerge.cli.options import (add_common, add_config_option, check_common, check_method, check_reduction,
                                    default_workers, read_config)

if TYPE_CHECKING:
    from mambamerge.merge.recipe import MergeRecipe

HELP = "evaluate methods x reductions beside the dense model; write a table, CSV, JSON and an accuracy plot"
EXAMPLES = ("--checkpoint model.safetensors --data fashion-mnist --limit 2000 --out outputs/sweep",
            "--checkpoint vim_t_midclstok_76p1acc.pth --data imagenet/val --methods mame tome --reductions 0.2 0.4 "
            "--out outputs/imagenet",
            "--checkpoint model.safetensors --data fsdd --option schedule=constant --option every=1 --out outputs/fsdd")


def add_parser(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"methods to compare (default: the one a fine-tuned checkpoint records, with its options; "
                        f"else all: {', '.join(METHODS)})")
    p.add_argument("--reductions", nargs="+", type=float, default=[0.2, 0.4, 0.6, 0.8], metavar="R",
                   help="target average reductions in [0, 1) (default: 0.2 0.4 0.6 0.8)")
    add_config_option(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the results (created if needed)")


def check_sweep_options(options: Dict[str, object]) -> None:
    """The sweep sets each schedule from a --reductions target: only its shape may be given."""
    fixed = sorted(set(options) & {"r", "keep"})
    if fixed:
        raise ValueError(f"--option {fixed[0]}= fixes the schedule, but a sweep derives it from each --reductions "
                         f"target; give only schedule=constant|geometric, start= and every=")
    if options.get("schedule", "geometric") not in ("constant", "geometric"):
        raise ValueError(f"--option schedule= must be constant or geometric in a sweep, got {options['schedule']!r}")
    for key in ("start", "every"):
        value = options.get(key, 1)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--option {key}= must be an integer of at least 1, got {value!r}")


def plan(model, methods: List[str], reductions: List[float], options: Dict[str, object]) -> List[dict]:
    """One entry per method x reduction: method, target_reduction, options; where the method cannot
    reach the target, also status "n/a" and the reason (found by patching, which runs no image); for an
    unreachable target also the note it shares with the other targets of its schedule and method, and
    most_reduction."""
    from mambamerge.merge.schedule import UnreachableTarget
    from mambamerge.patch import patch, unpatch

    configs = []
    for method in methods:
        for reduction in reductions:
            config = {"method": method, "target_reduction": reduction, "options": dict(options)}
            try:
                patch(model, method, reduction=reduction, **options)
            except UnreachableTarget as err:
                config.update(status="n/a", reason=str(err), most_reduction=err.most,
                              note=f"{err.schedule} cannot reach the target with this method; {err.advice}")
            except ValueError as err:
                config.update(status="n/a", reason=str(err))
            finally:
                unpatch(model)
            configs.append(config)
    return configs


def measure(model, dataset, configs: List[dict], options: Dict[str, object], **timing) -> List[dict]:
    """The dense row, then one row per configuration (n/a ones as they are), with status, delta_top1
    and delta_top5 against the dense row (each row's speedup is against the dense forward timed with
    it, dense_inputs_per_s). Off a terminal a plain line says each configuration's top-1 as it ends."""
    from mambamerge.evaluate import evaluate
    from mambamerge.progress import progress

    runnable = [c for c in configs if "reason" not in c]
    measured = []
    with progress(total=len(runnable) + 1, desc="sweep", unit="configs", leave=True) as bar:
        for config in [{"method": None, "target_reduction": 0.0}] + runnable:
            name = f"{config['method']} {config['target_reduction']:.0%}" if config["method"] else "dense"
            bar.set_postfix_str(name)
            measured.append(evaluate(model, dataset, config["method"], config["target_reduction"],
                                     progress=f"{name}: top-1", **timing, **(options if config["method"] else {})))
            bar.finished(f"{name}: top-1 {measured[-1]['top1']:.2%}")
    dense, done = measured[0], iter(measured[1:])
    rows = [dense] + [config if "reason" in config else next(done) for config in configs]
    for row in rows:
        if "reason" not in row:
            against_dense(row, dense)
    return rows


def against_dense(row: dict, dense: dict) -> dict:
    """A measured row marked ok, with its top-1 and top-5 differences to the dense row."""
    row.update(status="ok", delta_top1=row["top1"] - dense["top1"],
               delta_top5=None if row["top5"] is None else row["top5"] - dense["top5"])
    return row


def tuned_row(model, dataset, recipe: "MergeRecipe", reduction: float, dense: dict, **timing) -> dict:
    """The row of a tune configuration (mambamerge tune's config_<R>.json, read as `recipe`; it reached
    `reduction`), named "tuned", against the dense row."""
    from mambamerge.evaluate import evaluate

    row = evaluate(model, dataset, recipe.method, None, progress="tuned: top-1", **timing, **recipe.patch_options())
    row.update(method="tuned", tuned_method=recipe.method, target_reduction=reduction)
    return against_dense(row, dense)


def run(args: argparse.Namespace) -> int:
    """The sweep, holding --out's lock all along (atomic.hold): a second sweep into it is refused at once."""
    from mambamerge.atomic import hold
    from mambamerge.distributed import world
    from mambamerge.results import check_writable

    out = check_writable(args.out, create=False)
    with hold(out, "mambamerge sweep") if world().is_main else nullcontext(out):
        return _sweep(args, out)


def _sweep(args: argparse.Namespace, out: Path) -> int:
    from mambamerge import distributed
    from mambamerge.atomic import write_files
    from mambamerge.data import subset_record, unreadable
    from mambamerge.distributed import world
    from mambamerge.plots import accuracy_png
    from mambamerge.results import csv_text, environment, json_text, markdown_table

    options = check_common(args)
    config = read_config(args.config)
    check_sweep_options(options)
    for method in args.methods or ():
        check_method(method, options)
    for reduction in args.reductions:
        check_reduction(reduction)
    model, dataset, label = load_inputs(args)
    if config is not None:
        from mambamerge.tune import recipe_of_config

        tuned = recipe_of_config(config, model)  # a config of another model is refused before any work
    methods = args.methods
    if methods is None:
        recipe = recorded_merge(model, args.checkpoint, "sweep", "sweeping that method with those options at each "
                                                                 "--reductions target (--methods NAME ... compares "
                                                                 "others)", schedule=False)
        methods = [recipe.method] if recipe else list(METHODS)
        if recipe:
            options = {**recipe.changed_options(), **options}
        for method in methods:
            check_method(method, options)
    configs = plan(model, list(dict.fromkeys(methods)), list(dict.fromkeys(args.reductions)), options)
    timing = dict(batch_size=args.batch_size, throughput_batch=args.throughput_batch, runs=args.runs, warmup=1,
                  amp=args.amp, workers=default_workers(args.workers), compile=args.compile)
    rows = measure(model, dataset, configs, options, **timing)
    if config is not None:
        rows.append(tuned_row(model, dataset, tuned, config["reduction"], rows[0], **timing))
    distributed.teardown()
    if not world().is_main:
        return 0
    device = next(model.parameters()).device
    env = environment(device)
    kind = model.input_kind
    table = markdown_table(rows, kind)
    skipped = unreadable(dataset)
    title = f"{Path(args.checkpoint).name} on {label} ({len(dataset) - len(skipped)} {kind})"
    payload = {"checkpoint": str(args.checkpoint), "model": model.cfg.to_dict(),
               "data": {"spec": args.data, "label": label, "inputs": len(dataset) - len(skipped), "input_kind": kind,
                        "unreadable_images": skipped, "classes": dataset.info.classes, **subset_record(args.limit)},
               "settings": {"methods": methods, "reductions": args.reductions, "options": options,
                            "config": args.config, **timing},
               "environment": env, "rows": rows}
    plot = accuracy_png([row for row in rows if row["status"] == "ok"], title,
                        f"batch {args.throughput_batch}, {env['device']}, threads: {env['threads']}", kind)
    write_files(out, {"results.md": f"# {title}\n\n{describe(model, args.checkpoint)}\n\n{table}",
                      "results.csv": csv_text(rows), "results.json": json_text(payload), "accuracy.png": plot})
    print(table, end="")
    if skipped:
        print(f"\nskipped {len(skipped)} unreadable files (named in the warnings above and in results.json)")
    print(f"\nresults: {out / 'results.md'}, results.csv, results.json\nplot:    {out / 'accuracy.png'}")
    return 0
