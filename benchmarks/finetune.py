"""Off-the-shelf vs fine-tuned with merging active: how much of the accuracy a short fine-tune with each
method buys back, at one average reduction, from the same checkpoint, data, schedule and settings.

Each method: top-1 of the patched checkpoint as it is, then `mambamerge.train` with the method active
(the selections are not differentiated, the merges are), then top-1 again; the dense checkpoint's top-1
beside them. Test split = the evaluation set; nothing is chosen on it (fixed epochs, last epoch kept).

Run: .venv/bin/python benchmarks/finetune.py [--methods mame stm tome] [--reduction 0.6] [--epochs 1]
Default checkpoint: the shipped demo model; needs the Fashion-MNIST train split (./run.sh data).
"""
import argparse
import tempfile

import torch

import mambamerge
from mambamerge.cli.demo import demo_checkpoint
from mambamerge.data import load_dataset
from mambamerge.evaluate import accuracy
from mambamerge.train import TrainConfig, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--methods", nargs="+", default=["mame", "stm", "tome", "tome_unordered", "random"])
    parser.add_argument("--reduction", type=float, default=0.6)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=None, help="first N training images only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.checkpoint or demo_checkpoint()
    size = mambamerge.load_checkpoint(path).cfg.img_size[0]
    train_set = load_dataset(args.data, "train", img_size=size, limit=args.limit, augment=True)
    test_set = load_dataset(args.data, "test", img_size=size)
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, warmup_epochs=0.1, seed=3)
    with torch.inference_mode():
        dense = accuracy(mambamerge.load_checkpoint(path), test_set)
    print(f"{path}: dense top-1 {dense:.2%} on {len(test_set)} {args.data} test images; fine-tuning "
          f"{args.epochs} epoch(s) on {len(train_set)} images, lr {args.lr}, at {args.reduction:.0%} average reduction")
    print("| method | off-the-shelf | fine-tuned | recovered (pp) |\n|---|---|---|---|")
    for method in args.methods:
        model = mambamerge.patch(mambamerge.load_checkpoint(path), method, reduction=args.reduction)
        with torch.inference_mode():
            before = accuracy(model, test_set)
        with tempfile.TemporaryDirectory() as out:
            after = train(model, train_set, test_set, out, cfg, log=lambda _: None)["history"][-1]["val_accuracy"]
        print(f"| {method} | {before:.2%} | {after:.2%} | {100 * (after - before):+.2f} |", flush=True)


if __name__ == "__main__":
    main()
