"""Dense / off-the-shelf / fine-tuned without and with distillation from the dense model, per method at
one average reduction, from the same checkpoint, data, schedule and settings.

Each method: top-1 of the patched checkpoint as it is; then `mambamerge.train` with the method active
(the selections are not differentiated, the merges are), once with cross-entropy alone and once with
a KL term to the dense checkpoint's logits (R-MeeTo's re-training recipe); the epoch is selected on a
validation slice held out of the TRAINING split, and the test split is only reported (top-1 of the
selected weights).

Resumable: every finished number is stored in OUT/results.json at once and every training run
saves OUT/<method>-<variant>/last.pt every --save-every steps; run the same command again after an
interruption and it continues where it stopped. The table is printed at the end (and is rebuilt
from OUT/results.json by any later run).

Run: .venv/bin/python benchmarks/finetune.py --out runs/finetune [--methods mame stm tome rmeeto]
     [--reduction 0.6] [--epochs 1] [--limit N] [--val 2000] [--test-limit N]
Default checkpoint: the shipped demo model; needs the Fashion-MNIST train split (./run.sh data).
"""
import argparse
import json
from pathlib import Path

import torch

import mambamerge
from mambamerge.atomic import write_bytes
from mambamerge.cli.demo import demo_checkpoint
from mambamerge.data import load_dataset
from mambamerge.data.loading import holdout_split
from mambamerge.evaluate import accuracy
from mambamerge.train import TrainConfig, train

VARIANTS = {"ce": None, "distilled": "dense"}


def table(results: dict, methods, variants) -> str:
    head = ["method", "off-the-shelf"] + [f"fine-tuned ({v})" for v in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| dense | {results['dense']:.2%} |" + " |" * len(variants) if "dense" in results else ""]
    for method in methods:
        cells = [results.get(f"{method}/off-the-shelf")] + [results.get(f"{method}/{v}") for v in variants]
        lines.append(f"| {method} | " + " | ".join("running / not run" if c is None else f"{c:.2%}" for c in cells)
                     + " |")
    return "\n".join(line for line in lines if line) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--out", required=True, help="folder for results.json and the training runs")
    parser.add_argument("--methods", nargs="+", default=["mame", "stm", "tome", "rmeeto"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--reduction", type=float, default=0.6)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--distill-temperature", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=None, help="first N training images (after the hold-out)")
    parser.add_argument("--val", type=float, default=2000, help="validation images held out of train (or fraction)")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--save-every", type=int, default=10, help="steps between saves of last.pt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.checkpoint or demo_checkpoint()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}

    def record(key, value):
        results[key] = value
        write_bytes(store, json.dumps(results, indent=1))

    size = mambamerge.load_checkpoint(path).cfg.img_size[0]
    full = load_dataset(args.data, "train", img_size=size)
    train_index, val_index = holdout_split(len(full), args.val)
    train_set = full.subset(train_index[:args.limit], augment=True)
    val_set = full.subset(val_index, augment=False)
    test_set = load_dataset(args.data, "test", img_size=size, limit=args.test_limit)
    cfg = dict(epochs=args.epochs, batch_size=128, lr=args.lr, warmup_epochs=0.1, seed=3,
               distill_weight=args.distill_weight, distill_temperature=args.distill_temperature)
    print(f"{path}: {len(train_set)} training images, {len(val_set)} held out for validation, {len(test_set)} "
          f"{args.data} test images (reported only); {args.epochs} epoch(s), lr {args.lr}, "
          f"{args.reduction:.0%} average reduction", flush=True)
    if "dense" not in results:
        record("dense", accuracy(mambamerge.load_checkpoint(path), test_set))
    for method in args.methods:
        key = f"{method}/off-the-shelf"
        if key not in results:
            record(key, accuracy(mambamerge.patch(mambamerge.load_checkpoint(path), method,
                                                  reduction=args.reduction), test_set))
        for variant in args.variants:
            key = f"{method}/{variant}"
            if key in results:
                continue
            run_dir = out / f"{method}-{variant}"
            model = mambamerge.patch(mambamerge.load_checkpoint(path), method, reduction=args.reduction)
            teacher = mambamerge.load_checkpoint(path) if VARIANTS[variant] else None
            result = train(model, train_set, val_set, run_dir, TrainConfig(**cfg), teacher=teacher,
                           test_set=test_set, run={"method": method, "variant": variant},
                           resume=(run_dir / "last.pt").is_file(), save_every=args.save_every,
                           log=lambda line, tag=key: print(f"{tag}: {line}", flush=True))
            record(key, result["test_accuracy"])
            record(f"{key}/val", result["best_accuracy"])
    print(table(results, args.methods, args.variants), end="")


if __name__ == "__main__":
    main()
