"""bf16 autocast against float32 on the CPU: speed of dense and merged forwards, top-1 of every method.

Speed: for each model and batch, the float32 and bf16 forwards of the dense model and of MaMe at
--reduction are timed round-robin in one process (medians of --runs), and bf16 / float32 is printed.
Why bf16 can be slower: the share of the bf16 forward's time spent in torch's conversions of tensors
between float32 and bf16 (aten::_to_copy and aten::copy_ under torch.profiler) is printed beside it.
Accuracy: the demo model's top-1 on the first --images of the stratified Fashion-MNIST test subset, dense
and with each method at --reduction, in float32 and in bf16, and whether bf16 keeps the methods' order.

Run: .venv/bin/python benchmarks/amp.py [--models vim_tiny demo] [--batch 1 8] [--reduction 0.5]
     [--images 2000] [--runs 5] [--threads 1]
"""
import argparse
import os
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines off stderr
import torch

import mambamerge
from mambamerge.data import load_dataset
from mambamerge.devices import autocast, describe_cpu_bf16
from mambamerge.evaluate import accuracy
from mambamerge.timing import time_interleaved

DEMO = Path(mambamerge.__file__).parent / "assets" / "vim_nano_fmnist.safetensors"
METHODS = ("mame", "stm", "tome", "rmeeto", "evit", "top", "random")
CPU = torch.device("cpu")
CONVERSIONS = ("aten::_to_copy", "aten::copy_")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vim_tiny", "demo"],
                        help="named models (random weights) or 'demo' (the shipped Fashion-MNIST model)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--reduction", type=float, default=0.5, help="average reduction of the merged rows")
    parser.add_argument("--images", type=int, default=2000, help="demo test images for the top-1 table (0: none)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def build(name: str):
    torch.manual_seed(0)
    return (mambamerge.load_checkpoint(DEMO) if name == "demo" else mambamerge.create_model(name)).eval()


def forward(model, reducer, inputs, amp):
    def run():
        model.token_reducer = reducer
        with autocast(CPU, amp):
            return model(inputs)
    return run


def conversion_seconds(fn) -> float:
    """Seconds of one call's self CPU time in torch's float32 <-> bf16 conversions (the whole-mixer kernel's
    own rounding, inside one call the profiler cannot see into, is not among them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONVERSIONS) * 1e-6


def speed(name: str, batch: int, args) -> None:
    model = build(name)
    reducer = mambamerge.patch(model, "mame", reduction=args.reduction).token_reducer
    inputs = torch.randn(batch, *model.input_shape)
    fns = {(kind, amp): forward(model, reducer if kind == "mame" else None, inputs, amp)
           for kind in ("dense", "mame") for amp in ("none", "bf16")}
    seconds = time_interleaved(fns, warmup=1, runs=args.runs)
    for kind in ("dense", "mame"):
        fp32, bf16 = seconds[(kind, "none")], seconds[(kind, "bf16")]
        share = conversion_seconds(fns[(kind, "bf16")]) / bf16
        print(f"{name:>9} {batch:>5} {kind:>6} {fp32 * 1e3:>9.1f} {bf16 * 1e3:>9.1f} {fp32 / bf16:>10.2f}x "
              f"{share:>12.0%}")
    mambamerge.unpatch(model)


def top1(args) -> None:
    model = build("demo")
    data = load_dataset("fashion-mnist", "test", limit=args.images, input_shape=model.input_shape,
                        input_kind=model.input_kind)
    rows = []
    for method in (None, *METHODS):
        if method is not None:
            mambamerge.patch(model, method, reduction=args.reduction)
        rows.append((method or "dense", *(accuracy(model, data, amp=amp) for amp in ("none", "bf16"))))
        mambamerge.unpatch(model)
    print(f"\ndemo model top-1 on {len(data)} test images, {args.reduction:.0%} average reduction")
    print(f"{'method':>8} {'float32':>8} {'bf16':>8} {'diff':>7}")
    for method, fp32, bf16 in rows:
        print(f"{method:>8} {fp32:>8.2%} {bf16:>8.2%} {(bf16 - fp32) * 100:>+6.2f}")
    order = {amp: [r[0] for r in sorted(rows[1:], key=lambda r: -r[1 + i])] for i, amp in enumerate(("fp32", "bf16"))}
    same = order["fp32"] == order["bf16"]
    print(f"order of the methods: float32 {', '.join(order['fp32'])}; bf16 "
          f"{'the same' if same else ', '.join(order['bf16'])}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, inference mode, eager; {describe_cpu_bf16()}")
    print(f"medians of {args.runs} interleaved runs; mame at {args.reduction:.0%}; convert % = share of the bf16 "
          f"forward's time in torch's float32 <-> bf16 copies\n")
    print(f"{'model':>9} {'batch':>5} {'kind':>6} {'fp32 ms':>9} {'bf16 ms':>9} {'bf16 speed':>11} {'convert %':>12}")
    with torch.inference_mode():
        for name in args.models:
            for batch in args.batch:
                speed(name, batch, args)
        if args.images:
            top1(args)


if __name__ == "__main__":
    main()
