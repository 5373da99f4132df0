"""What one block costs on CPU as its token count falls: a block of each model (all its blocks, in turn,
so their weights come from memory as in a forward) at several lengths and batch sizes, with the whole
mixer in one kernel call (scan_impl "auto"), with the per-step kernels between torch's projections
("compiled") and on torch's operations, timed interleaved; per length the time a block takes, its
fixed part (the time at the shortest length) and what it costs a token above that.

Run: .venv/bin/python benchmarks/block_cost.py [--models vim_tiny vim_nano] [--batch 1 8]
     [--lengths 1 5 20 40 100 197] [--runs 7] [--threads 1]
"""
import argparse
from contextlib import nullcontext

import torch

import mambamerge
from mambamerge.timing import time_interleaved
from breakdown import torch_path  # (benchmarks/breakdown.py)


def all_blocks(model, hidden, residual, impl, context=nullcontext):
    """One call of every block of model on the same input: milliseconds per block come from it."""
    def run():
        model.set_scan_impl(impl)
        with context(), torch.inference_mode():
            for block in model.layers:
                block(hidden, residual)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vim_tiny", "vim_nano"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1, 5, 20, 40, 100, 197])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, inference mode, float32; ms per block (medians of {args.runs} "
          f"interleaved runs over all the model's blocks)")
    for name in args.models:
        torch.manual_seed(0)
        model = mambamerge.create_model(name).eval()
        weights = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
        for batch in args.batch:
            print(f"\n== {name}, batch {batch}: {len(model.layers)} blocks of {weights / 1e6:.2f} MB of weights")
            print(f"{'L':>5} {'whole ms':>9} {'per-step ms':>12} {'torch ms':>9} {'per-step/whole':>15}")
            rows = {}
            for length in args.lengths:
                hidden = torch.randn(batch, length, model.cfg.embed_dim)
                residual = torch.randn(batch, length, model.cfg.embed_dim)
                times = time_interleaved({
                    "whole": all_blocks(model, hidden, residual, "auto"),
                    "per-step": all_blocks(model, hidden, residual, "compiled"),
                    "torch": all_blocks(model, hidden, residual, "compiled", torch_path)}, runs=args.runs)
                ms = {k: 1e3 * v / len(model.layers) for k, v in times.items()}
                rows[length] = ms
                print(f"{length:>5} {ms['whole']:>9.3f} {ms['per-step']:>12.3f} {ms['torch']:>9.3f} "
                      f"{ms['per-step'] / ms['whole']:>15.2f}")
            first, last = min(rows), max(rows)
            if last > first:
                for path in ("whole", "per-step", "torch"):
                    per_token = (rows[last][path] - rows[first][path]) / (last - first)
                    print(f"  {path:<9} fixed (L={first}) {rows[first][path]:.3f} ms = "
                          f"{100 * rows[first][path] / rows[last][path]:.0f}% of L={last}; "
                          f"{1e3 * per_token / batch:.1f} us a token above it")


if __name__ == "__main__":
    main()
