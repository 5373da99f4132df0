"""What carries a tuned configuration's gain: top-1 on the test split of each `mambamerge tune` config and of
variants with one part reset to its method's default (each changed option alone, all options, the
per-block schedule, everything), and MaMe's defaults, at the same reduction, in one table with standard
errors.

Run: .venv/bin/python benchmarks/tune_ablation.py --checkpoint FILE --data SPEC DIR/config_0.6.json [...]
"""
import argparse
import json
import math
from pathlib import Path
from typing import List, Optional, Tuple

import torch

import mambamerge
from mambamerge.budget import GIGA
from mambamerge.cli.inputs import open_data
from mambamerge.evaluate import accuracy
from mambamerge.flops import flops
from mambamerge.merge import METHODS
from mambamerge.patch import make_reducer

Variant = Tuple[str, str, dict, Optional[List[int]]]  # name, method, options, removals (None: default schedule)


def variants(config: dict) -> List[Variant]:
    """The tuned config, then each part of it reset to the method's default: every changed option alone,
    all of them (when more than one changed), the schedule (the method's own at the same reduction),
    everything; and MaMe's defaults when the tuned method is another."""
    method, options, removals = config["method"], config["options"], list(config["removals"])
    defaults = METHODS[method].options()
    changed = [k for k, v in options.items() if defaults.get(k) != v]
    out = [("tuned", method, options, removals)]
    out += [(f"{k}: {options[k]!r} -> {defaults[k]!r}", method, dict(options, **{k: defaults[k]}), removals)
            for k in changed]
    if len(changed) > 1:
        out.append(("all options -> defaults", method, defaults, removals))
    out.append(("schedule -> default", method, options, None))
    out.append((f"everything -> {method} defaults", method, defaults, None))
    if method != "mame":
        out.append(("MaMe defaults", "mame", {}, None))
    return out


def target(config: dict) -> float:
    """The average reduction the default schedules are made for: the tune's target, else what it reached."""
    return config.get("budget", {}).get("reduction", config["reduction"])


def measure(model, data, method: str, options: dict, removals: Optional[List[int]], reduction: float) -> dict:
    """Top-1 and its standard error, the reduction reached and GMACs (one scan direction, merge
    included) of `model` patched so; {"error": why} where the variant cannot run."""
    try:
        reducer = make_reducer(model, method, None if removals else reduction, removals, **options)
    except ValueError as err:
        return {"error": str(err)}
    model.token_reducer = reducer
    try:
        top1 = accuracy(model, data)
        gmacs = flops(model).total_one_direction / GIGA
    finally:
        model.token_reducer = None
    return {"top1": top1, "se": math.sqrt(top1 * (1 - top1) / len(data)), "gmacs": gmacs,
            "reduction": reducer.schedule.average_reduction(model.layout.length)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="config files mambamerge tune wrote")
    parser.add_argument("--checkpoint", required=True, metavar="FILE")
    parser.add_argument("--data", required=True, metavar="SPEC", help="as for mambamerge eval")
    parser.add_argument("--split", help="the split of a named data set reported on (default: test)")
    parser.add_argument("--limit", type=int, metavar="N", help="that many test inputs, stratified (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.set_defaults(img_size=None)  # a tuned config is for the trained input size
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [(path, json.loads(Path(path).read_text())) for path in args.configs]

    def check_configs(model) -> None:
        """A config of another model is refused before any data is read."""
        for path, config in configs:
            try:
                make_reducer(model, config["method"], schedule=list(config["removals"]), **config["options"])
                mambamerge.patch(model, config=config)
            except (ValueError, KeyError) as err:
                raise SystemExit(f"{path} does not fit {args.checkpoint}: {err}") from None
            mambamerge.unpatch(model)

    try:  # the model and its inputs as every command opens them: any family, every mismatch named
        model, data, data_label = open_data(args, default_split="test", limit=args.limit, check=check_configs)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    model.eval()
    dense = accuracy(model, data)
    print(f"{Path(args.checkpoint).name} on {data_label}: {len(data)} inputs, dense top-1 {dense:.2%} "
          f"(standard error {math.sqrt(dense * (1 - dense) / len(data)):.2%})\n")
    print("| config | variant | top-1 | ± s.e. | vs tuned | reduction | GMACs |\n|---|---|---|---|---|---|---|")
    for path, config in configs:
        tuned = None
        for name, method, options, removals in variants(config):
            row = measure(model, data, method, options, removals, target(config))
            label = f"{Path(path).parent.name}/{Path(path).name}"
            if "error" in row:
                print(f"| {label} | {name} | n/a | | | | {row['error']} |", flush=True)
                continue
            tuned = row["top1"] if tuned is None else tuned
            print(f"| {label} | {name} | {row['top1']:.2%} | {row['se']:.2%} | {row['top1'] - tuned:+.2%} | "
                  f"{row['reduction']:.1%} | {row['gmacs']:.4g} |", flush=True)


if __name__ == "__main__":
    main()
