"""Which design choices carry the accuracy at aggressive reduction: off-the-shelf top-1 of method
variants (ALGORITHMS.md §2 options) at equal average reduction, on a trained checkpoint.

Run: .venv/bin/python benchmarks/ablation.py [--checkpoint FILE] [--data fashion-mnist] [--limit 2000]
Default checkpoint: the shipped demo model.
"""
import argparse

import torch

import mambamerge
from mambamerge.cli.demo import demo_checkpoint
from mambamerge.data import load_dataset
from mambamerge.evaluate import accuracy
from mambamerge.merge.mame import PAPER_AS_READ

VARIANTS = [
    ("mame", {}),
    ("mame", PAPER_AS_READ),
    ("mame", {"match": "window"}),
    ("mame", {"match": "bipartite"}),
    ("mame", {"weight": "size"}),
    ("mame", {"placement": "important"}),
    ("mame", {"feature": "hidden"}),
    ("mame", {"sources": "most_delta"}),
    ("mame", {"sources": "random"}),
    ("mtr", {}),
    ("stm", {}),
    ("stm", {"w_protect": 0}),
    ("stm", {"w_protect": 8}),
    ("stm", {"mode": "sum"}),
    ("stm", {"weight": "size"}),
    ("tome", {}),
    ("tome_unordered", {}),
    ("rmeeto", {}),
    ("top", {}),
    ("evit", {}),
    ("random", {}),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.6, 0.8])
    parser.add_argument("--every", type=int, nargs="+", default=[2], help="schedule step spacing(s) to compare")
    args = parser.parse_args(argv)
    model = mambamerge.load_checkpoint(args.checkpoint or demo_checkpoint())
    data = load_dataset(args.data, "test", img_size=model.cfg.img_size[0], limit=args.limit)
    dense = accuracy(model, data)
    print(f"dense top-1 {dense:.2%} on {len(data)} {args.data} test images")
    header = "| method | options | every | " + " | ".join(f"{r:.0%}" for r in args.reductions) + " |"
    print(header + "\n|" + "---|" * (3 + len(args.reductions)))
    for every in args.every:
        for method, options in VARIANTS:
            cells = []
            for reduction in args.reductions:
                try:
                    mambamerge.patch(model, method, reduction=reduction, every=every, **options)
                    cells.append(f"{accuracy(model, data):.2%}")
                except ValueError:
                    cells.append("n/a")
                finally:
                    mambamerge.unpatch(model)
            opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            print(f"| {method} | {opts} | {every} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
