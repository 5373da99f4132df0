"""Dense vs token-reducing Vim-Ti on CPU: FLOPs, ideal and measured speed-up, merge overhead.

For each method and target average reduction (default schedule of mambamerge.patch), the dense and
the patched forwards are timed in one process, interleaved, medians of --runs (ALGORITHMS.md §4).
Ideal speed-up = dense tokens / average tokens per layer; the merge overhead is the time spent in
model.token_reducer.step (scoring, matching, gathers), timed in separate forwards.

Run: .venv/bin/python benchmarks/merge.py [--methods mame tome] [--reductions 0.2 0.5] [--batch 8] [--runs 5]
"""
import argparse
import statistics
import time

import torch

import mambamerge
from mambamerge.flops import flops
from mambamerge.merge import METHODS
from mambamerge.timing import time_interleaved

TARGET_REDUCTION = 0.5
TARGET_RATIO = 0.85     # measured speed-up / ideal speed-up at 50%
TARGET_OVERHEAD = 0.05  # merge time / merged forward time at 50%


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS),
                        help="methods to run (default: every registered one)")
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.2, 0.4, 0.5, 0.6],
                        help="target average reductions in [0, 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per configuration (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start", type=int, default=None, help="first block a schedule step precedes")
    parser.add_argument("--every", type=int, default=None, help="blocks between schedule steps")
    return parser.parse_args(argv)


def reducers(model, method, reductions, **schedule):
    """{reduction: TokenReducer or the reason it cannot be built}; the model is left dense."""
    out = {}
    for reduction in reductions:
        try:
            out[reduction] = mambamerge.patch(model, method, reduction=reduction, **schedule).token_reducer
        except ValueError as err:
            out[reduction] = str(err)
        mambamerge.unpatch(model)
    return out


def forward_with(model, reducer, images):
    """A forward of `model` with `reducer` attached (None: dense)."""
    def run():
        model.token_reducer = reducer
        return model(images)
    return run


def merge_seconds(model, reducer, images, runs):
    """Median seconds per forward spent in reducer.step, timed by wrapping the bound method."""
    step, spent, per_forward = reducer.step, [0.0], []

    def timed(*args):
        start = time.perf_counter()
        out = step(*args)
        spent[0] += time.perf_counter() - start
        return out

    reducer.step = timed
    try:
        for _ in range(runs):
            spent[0] = 0.0
            forward_with(model, reducer, images)()
            per_forward.append(spent[0])
    finally:
        del reducer.step
    return statistics.median(per_forward)


def bench_method(model, method, reductions, images, runs, **schedule):
    """Rows of measurements for one method: dict per reduction, or (reduction, reason) when unreachable."""
    built = reducers(model, method, reductions, **schedule)
    ready = {r: red for r, red in built.items() if not isinstance(red, str)}
    fns = {"dense": forward_with(model, None, images)}
    fns.update({r: forward_with(model, red, images) for r, red in ready.items()})
    med = time_interleaved(fns, warmup=1, runs=runs)
    dense_flops = flops(mambamerge.unpatch(model))
    rows = []
    for reduction, red in built.items():
        if isinstance(red, str):
            rows.append((reduction, red))
            continue
        model.token_reducer = red
        report = flops(model)
        overhead = merge_seconds(model, red, images, runs)
        ideal = dense_flops.tokens[0] / report.average_tokens
        measured = med["dense"] / med[reduction]
        rows.append(dict(reduction=reduction, average_tokens=report.average_tokens, final_tokens=report.tokens[-1],
                         dense_gflops=dense_flops.one_direction / 1e9, gflops=report.total_one_direction / 1e9,
                         dense_ms=med["dense"] * 1e3, merged_ms=med[reduction] * 1e3, ideal=ideal,
                         measured=measured, ratio=measured / ideal, overhead_ms=overhead * 1e3,
                         overhead_share=overhead / med[reduction]))
    mambamerge.unpatch(model)
    return rows


HEADER = (f"{'target':>6} {'avg tok':>7} {'final':>5} {'GFLOPs':>14} {'dense ms':>8} {'merged ms':>9} "
          f"{'ideal x':>7} {'meas. x':>7} {'meas/ideal':>10} {'merge ms':>8} {'merge %':>7}")


def format_row(row):
    if isinstance(row, tuple):
        return f"{row[0]:>6.0%} unreachable: {row[1]}"
    return (f"{row['reduction']:>6.0%} {row['average_tokens']:>7.1f} {row['final_tokens']:>5d} "
            f"{row['dense_gflops']:>6.3f}->{row['gflops']:<6.3f}  {row['dense_ms']:>8.1f} {row['merged_ms']:>9.1f} "
            f"{row['ideal']:>7.2f} {row['measured']:>7.2f} {row['ratio']:>10.2f} {row['overhead_ms']:>8.2f} "
            f"{row['overhead_share']:>7.1%}")


def format_targets(method, row):
    ok = row["ratio"] >= TARGET_RATIO and row["overhead_share"] < TARGET_OVERHEAD
    return (f"  {method} at {TARGET_REDUCTION:.0%}: measured/ideal {row['ratio']:.2f} (target >= {TARGET_RATIO}), "
            f"merge {row['overhead_share']:.1%} of the merged forward (target < {TARGET_OVERHEAD:.0%}): "
            f"{'met' if ok else 'NOT met'}")


def main(argv=None):
    args = parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(METHODS))}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_tiny").eval()
    images = torch.randn(args.batch, 3, 224, 224)
    print(f"Vim-Ti (random weights), CPU, {args.threads} threads, batch {args.batch}, 224x224, inference mode; "
          f"medians of {args.runs} interleaved runs. GFLOPs = GMACs one direction (literature), merged incl. "
          f"scoring; ideal x = dense tokens / average tokens per layer; merge = time in token_reducer.step")
    targets = []
    with torch.inference_mode():
        for method in args.methods:
            print(f"\n{method}\n{HEADER}")
            schedule = {k: v for k, v in (("start", args.start), ("every", args.every)) if v is not None}
            for row in bench_method(model, method, args.reductions, images, args.runs, **schedule):
                print(format_row(row))
                if isinstance(row, dict) and abs(row["reduction"] - TARGET_REDUCTION) < 1e-9:
                    targets.append(format_targets(method, row))
    if targets:
        print("\nTargets at 50% average reduction:")
        print("\n".join(targets))


if __name__ == "__main__":
    main()
