"""The fixed cost of a reduction step and of a block on CPU: the torch operations one step and one block
issue (torch.profiler, top-level operations: deterministic) and their times, with the merged and dense
forwards timed interleaved.

With --baseline SRC (the src folder of another version, e.g. `git archive <commit> src | tar -x -C /tmp/old`)
the same measurements run in fresh processes alternating between that version and this one, --rounds
times, and the ratios this / baseline are printed beside the operations each issues, op by op.

Run: .venv/bin/python benchmarks/step_cost.py [--models vim_nano vim_tiny] [--batch 1 8] [--method mame]
     [--reduction 0.5] [--runs 20] [--threads 1] [--baseline /tmp/old/src --rounds 3]
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vim_nano", "vim_tiny"], help="named models (random weights)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes")
    p.add_argument("--method", default="mame")
    p.add_argument("--reduction", type=float, default=0.5, help="target average reduction")
    p.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline", type=Path, help="src folder of the version to compare against")
    p.add_argument("--rounds", type=int, default=3, help="processes per version with --baseline, alternating")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one measurement, JSON on stdout
    return p.parse_args(argv)


def top_level_ops(fn):
    """{operation name: count} of the top-level torch operations fn issues."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)


def measure(name, batch, args):
    """Operations and median milliseconds of one model at one batch size, in this process."""
    import torch

    import mambamerge
    from mambamerge.timing import time_interleaved

    torch.manual_seed(0)
    model = mambamerge.create_model(name).eval()
    images = torch.randn(batch, *model.input_shape)
    reducer = mambamerge.patch(model, args.method, reduction=args.reduction).token_reducer
    first = next(i for i in range(len(model.layers)) if reducer.removal_after(i))
    step, record = reducer.step, {}

    def spy(block, state, ssm):  # keeps the first step's inputs, to replay that step alone
        if block == first and not record:
            record.update(block=block, state=state, ssm=ssm)
        return step(block, state, ssm)

    with torch.inference_mode():
        reducer.step = spy
        model(images)
        del reducer.step
        x = torch.randn(batch, model.layout.length, model.cfg.embed_dim)
        hidden, residual = model.layers[1](x, None)
        fns = {"step": lambda: step(record["block"], record["state"], record["ssm"]),
               "block": lambda: model.layers[1](hidden, residual),
               "block_ssm": lambda: model.layers[1](hidden, residual, return_ssm=True)}
        ops = {part: top_level_ops(fn) for part, fn in fns.items()}
        times = time_interleaved(fns, warmup=2, runs=args.runs)

        def forward_with(token_reducer):
            def run():
                model.token_reducer = token_reducer
                return model(images)
            return run
        times.update(time_interleaved({"merged": forward_with(reducer), "dense": forward_with(None)},
                                      warmup=1, runs=args.runs))
    return {"ops": {part: dict(counts) for part, counts in ops.items()},
            "ms": {part: seconds * 1e3 for part, seconds in times.items()}}


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    out = {f"{name} {batch}": measure(name, batch, args) for name in args.models for batch in args.batch}
    print(json.dumps(out))


def run_version(src, args):
    """One worker process on the package under `src`: its measurements."""
    argv = [sys.executable, __file__, "--worker", "--models", *args.models, "--batch", *map(str, args.batch),
            "--method", args.method, "--reduction", str(args.reduction), "--runs", str(args.runs),
            "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the measurement with {src} failed:\n{done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)


PARTS = ("step", "block", "block_ssm", "merged", "dense")


def report(versions, args):
    """Print ops and median times per configuration; with two versions, their ratios and op differences."""
    names = list(versions)
    for config in versions[names[0]][0]:
        print(f"\n== {config.replace(' ', ', batch ')}: {args.method} at {args.reduction:.0%}")
        ms = {v: {part: statistics.median(run[config]["ms"][part] for run in runs) for part in PARTS}
              for v, runs in versions.items()}
        ops = {v: runs[0][config]["ops"] for v, runs in versions.items()}
        print(f"{'':10}" + "".join(f"{v + ' ops':>14}{v + ' ms':>14}" for v in names)
              + (f"{'ms ratio':>10}" if len(names) == 2 else ""))
        for part in PARTS:
            cells = "".join(f"{sum(ops[v][part].values()) if part in ops[v] else '':>14}{ms[v][part]:>14.3f}"
                            for v in names)
            ratio = f"{ms[names[1]][part] / ms[names[0]][part]:>10.3f}" if len(names) == 2 else ""
            print(f"{part:10}{cells}{ratio}")
        print(f"dense / merged forward: " + ", ".join(f"{v} {ms[v]['dense'] / ms[v]['merged']:.3f}x" for v in names))
        if len(names) == 2:
            for part in ("step", "block_ssm"):
                old, new = (collections.Counter(ops[v][part]) for v in names)
                diff = {op: (old[op], new[op]) for op in sorted(set(old) | set(new)) if old[op] != new[op]}
                print(f"{part} ops {names[0]} -> {names[1]}: "
                      + (", ".join(f"{op.removeprefix('aten::')} {a}->{b}" for op, (a, b) in diff.items()) or "same"))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    load = os.getloadavg()[0]
    print(f"CPU, {args.threads} threads, inference mode; medians of {args.runs} interleaved runs in each process"
          + (f", {args.rounds} processes per version, alternating (median of theirs)" if args.baseline else "")
          + f"; load average at start {load:.2f}. ops: top-level torch operations (torch.profiler).")
    if args.baseline is None:
        return report({"this": [run_version(SRC, args)]}, args)
    if not (args.baseline / "mambamerge").is_dir():
        raise SystemExit(f"--baseline {args.baseline}: no mambamerge package there; give the src folder of a "
                         f"checkout, e.g. from `git archive <commit> src | tar -x -C /tmp/old`")
    versions = {"baseline": [], "this": []}
    for _ in range(args.rounds):
        for version, src in (("baseline", args.baseline), ("this", SRC)):
            versions[version].append(run_version(src, args))
    report(versions, args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; took until {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
