"""Dense vs token-reducing models on CPU: FLOPs, ideal and measured speed-up, cost of a reduction step.

For each model, batch size, method and target average reduction (default schedule of mambamerge.patch),
the dense and the patched forwards are timed in one process, interleaved, medians of --runs. Ideal
speed-up = dense tokens / average tokens per layer; the merge overhead is the time spent in
model.token_reducer.step (scoring, matching, gathers), timed in separate forwards, and the per-step cost
is that time over the number of steps; last, each method's measured / ideal against the goal (0.75 at
batch 1, 0.85 above). --compile times torch.compile'd forwards (dense and merged alike) and prints each
configuration's compile time apart from the timed runs.

Run: .venv/bin/python benchmarks/merge.py --batch 1 8 --models vim_tiny vim_nano --reductions 0.2 0.5 0.8
     [--methods mame tome] [--runs 5] [--threads 1] [--compile]
"""
import argparse
import statistics
import time

import torch

import mambamerge
from mambamerge.flops import flops
from mambamerge.merge import METHODS
from mambamerge.timing import time_interleaved


def goal(batch: int) -> float:
    """The least measured speed-up / ideal speed-up aimed at, at every reduction: latency (batch 1) pays a
    step's fixed cost on fewer tokens."""
    return 0.75 if batch == 1 else 0.85


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS),
                        help="methods to run (default: every registered one)")
    parser.add_argument("--models", nargs="+", default=["vim_tiny"], help="named models (random weights)")
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.2, 0.5, 0.8],
                        help="target average reductions in [0, 1)")
    parser.add_argument("--batch", nargs="+", type=int, default=[8], help="batch sizes")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per configuration (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="time torch.compile'd forwards; compile time is reported separately")
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


def forward_with(model, reducer, images, forward=None):
    """A forward of `model` (or of `forward`, its compiled wrapper) with `reducer` attached (None: dense)."""
    forward = model if forward is None else forward

    def run():
        model.token_reducer = reducer
        return forward(images)
    return run


def merge_seconds(model, reducer, images, runs):
    """(median seconds per forward spent in reducer.step, steps that remove tokens per forward), timed
    eagerly by wrapping the bound method."""
    step, spent, calls, per_forward = reducer.step, [0.0], [0], []

    def timed(block, *args):
        start = time.perf_counter()
        out = step(block, *args)
        spent[0] += time.perf_counter() - start
        calls[0] += reducer.removal_after(block) > 0  # a step that removes tokens (the others return at once)
        return out

    reducer.step = timed
    try:
        for _ in range(runs):
            spent[0], calls[0] = 0.0, 0
            forward_with(model, reducer, images)()
            per_forward.append(spent[0])
    finally:
        del reducer.step
    return statistics.median(per_forward), calls[0]


def compile_seconds(fns):
    """Seconds of each function's first call (the compile, for torch.compile'd forwards)."""
    out = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - start
    return out


def bench_method(model, method, reductions, images, runs, compiled=None, **schedule):
    """Rows of measurements for one method: dict per reduction, or (reduction, reason) when unreachable.
    `compiled`: the torch.compile'd model to time instead of the eager one (the step cost stays eager)."""
    built = reducers(model, method, reductions, **schedule)
    ready = {r: red for r, red in built.items() if not isinstance(red, str)}
    fns = {"dense": forward_with(model, None, images, compiled)}
    fns.update({r: forward_with(model, red, images, compiled) for r, red in ready.items()})
    compile_s = compile_seconds(fns) if compiled is not None else {}
    med = time_interleaved(fns, warmup=1, runs=runs)
    dense_flops = flops(mambamerge.unpatch(model))
    rows = []
    for reduction, red in built.items():
        if isinstance(red, str):
            rows.append((reduction, red))
            continue
        model.token_reducer = red
        report = flops(model)
        overhead, steps = merge_seconds(model, red, images, runs)
        ideal = dense_flops.tokens[0] / report.average_tokens
        measured = med["dense"] / med[reduction]
        rows.append(dict(reduction=reduction, average_tokens=report.average_tokens, final_tokens=report.tokens[-1],
                         dense_gflops=dense_flops.one_direction / 1e9, gflops=report.total_one_direction / 1e9,
                         dense_ms=med["dense"] * 1e3, merged_ms=med[reduction] * 1e3, ideal=ideal,
                         measured=measured, ratio=measured / ideal, overhead_ms=overhead * 1e3,
                         overhead_share=overhead / med[reduction], step_ms=overhead * 1e3 / max(steps, 1),
                         compile_s=compile_s.get(reduction)))
    mambamerge.unpatch(model)
    return rows, compile_s.get("dense")


HEADER = (f"{'target':>6} {'avg tok':>7} {'final':>5} {'GFLOPs':>14} {'dense ms':>8} {'merged ms':>9} "
          f"{'ideal x':>7} {'meas. x':>7} {'meas/ideal':>10} {'merge ms':>8} {'merge %':>7} {'step ms':>7}")


def format_row(row):
    if isinstance(row, tuple):
        return f"{row[0]:>6.0%} unreachable: {row[1]}"
    return (f"{row['reduction']:>6.0%} {row['average_tokens']:>7.1f} {row['final_tokens']:>5d} "
            f"{row['dense_gflops']:>6.3f}->{row['gflops']:<6.3f}  {row['dense_ms']:>8.1f} {row['merged_ms']:>9.1f} "
            f"{row['ideal']:>7.2f} {row['measured']:>7.2f} {row['ratio']:>10.2f} {row['overhead_ms']:>8.2f} "
            f"{row['overhead_share']:>7.1%} {row['step_ms']:>7.2f}"
            + (f"  compile {row['compile_s']:.1f} s" if row["compile_s"] is not None else ""))


def format_targets(label, method, batch, rows):
    """One line: the method's measured / ideal at each reduction against the goal at this batch size."""
    done = [r for r in rows if isinstance(r, dict)]
    missed = [f"{r['reduction']:.0%}" for r in done if r["ratio"] < goal(batch)]
    ratios = ", ".join(f"{r['ratio']:.2f} at {r['reduction']:.0%}" for r in done)
    return (f"  {label}, {method}: measured/ideal {ratios} (goal >= {goal(batch)}): "
            + (f"NOT met at {', '.join(missed)}" if missed else "met"))


def bench_model(name, batch, args, schedule, targets):
    """Print the tables of one model at one batch size; append its goal lines to `targets`."""
    torch.manual_seed(0)
    model = mambamerge.create_model(name).eval()
    images = torch.randn(batch, *model.input_shape)
    compiled = torch.compile(model) if args.compile else None
    label = f"{name} batch {batch}{' compiled' if args.compile else ''}"
    print(f"\n== {label}: input {tuple(images.shape)}, random weights")
    for method in args.methods:
        print(f"\n{method}\n{HEADER}")
        rows, dense_compile = bench_method(model, method, args.reductions, images, args.runs, compiled, **schedule)
        for row in rows:
            print(format_row(row))
        targets.append(format_targets(label, method, batch, rows))
        if dense_compile is not None:
            print(f"dense compile {dense_compile:.1f} s (first call; later calls reuse it)")


def main(argv=None):
    args = parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(METHODS))}")
    torch.set_num_threads(args.threads)
    if args.compile:  # one compiled graph per reducer (dynamo guards on model.token_reducer) and batch
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                    4 * len(args.methods) * (len(args.reductions) + 1))
    print(f"CPU, {args.threads} threads, inference mode{', torch.compile' if args.compile else ', eager'}; "
          f"medians of {args.runs} interleaved runs. GFLOPs = GMACs one direction (literature), merged incl. "
          f"scoring; ideal x = dense tokens / average tokens per layer; merge = time in token_reducer.step "
          f"(eager), step = merge time per reduction step")
    schedule = {k: v for k, v in (("start", args.start), ("every", args.every)) if v is not None}
    targets = []
    with torch.inference_mode():
        for name in args.models:
            for batch in args.batch:
                bench_model(name, batch, args, schedule, targets)
    if targets:
        print("\nGoals (measured / ideal at every reduction):")
        print("\n".join(targets))


if __name__ == "__main__":
    main()
