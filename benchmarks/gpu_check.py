"""GPU check of the mixer's CUDA paths (issue 12, item 5): parity with the CPU path, and dense vs merged
throughput of Vim-Ti and Vim-S.

Run on a machine with a CUDA GPU, from the repository root (mamba_ssm and causal-conv1d installed for
the fused path; without them only the pure-PyTorch GPU path is measured):
    python benchmarks/gpu_check.py [--batch 128] [--runs 10] [--amp none|bf16|fp16] [--method mame]
                                   [--reductions 0.3 0.5]

1. Which paths this machine has: the fused kernels (models/fused.py) when both packages import, and
   the pure-PyTorch path with the log-depth "parallel" scan.
2. Parity, float32 with TF32 off: logits of a random-weight Vim-Ti (batch 8) on the CPU (the default CPU
   path), and on the GPU through each path, dense and merged (--method at the largest of --reductions):
   max abs differences between them.
3. Throughput: Vim-Ti and Vim-S, batch --batch, 224x224, inference (autocast per --amp), for each GPU
   path: images/s dense and merged (medians of --runs interleaved runs, torch.cuda.synchronize around
   each), measured speed-up, ideal speed-up = dense FLOPs / merged FLOPs (both scan directions, merge
   overhead included; mambamerge.flops) and measured / ideal.
Without a usable CUDA device it says so and exits with status 2, having measured nothing.
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]

import mambamerge  # noqa: E402
from mambamerge import ops  # noqa: E402
from mambamerge.devices import AMP_CHOICES, autocast, check_amp  # noqa: E402
from mambamerge.flops import flops  # noqa: E402
from mambamerge.merge import METHODS  # noqa: E402
from mambamerge.timing import time_interleaved  # noqa: E402
from merge import forward_with, reducers  # noqa: E402  (benchmarks/merge.py)

MODELS = ("vim_tiny", "vim_small")
PARITY_BATCH = 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="throughput batch size")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per configuration (median)")
    parser.add_argument("--warmup", type=int, default=3, help="discarded runs per configuration")
    parser.add_argument("--amp", default="none", choices=AMP_CHOICES, help="autocast for the throughput runs")
    parser.add_argument("--method", default="mame", help="merging method for the merged runs")
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.3, 0.5],
                        help="target average reductions in [0, 1)")
    return parser.parse_args(argv)


def gpu_paths():
    """{name: scan_impl} of the mixer paths this machine can run on its GPU, fused first."""
    paths = {"fused": "fused"} if ops.fused_kernels() is not None else {}
    paths["pytorch"] = "parallel"
    return paths


def describe_paths(paths):
    found = {name: fn() is not None for name, fn in (("mamba_ssm", ops._mamba_ssm_fn),
                                                     ("causal_conv1d", ops._causal_conv1d_fn))}
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("imports: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in found.items()))
    print(f"GPU paths measured: {', '.join(paths)}"
          + ("" if "fused" in paths else " (no fused path: it needs both packages)"))


def parity(name, paths, method, reduction, device, batch=PARITY_BATCH, **options):
    """Print the max abs differences of the logits of model `name` (random weights, create_model options)
    between the CPU and each path on `device`, dense and merged."""
    torch.manual_seed(0)
    cpu_model = mambamerge.create_model(name, **options).eval()
    model = copy.deepcopy(cpu_model).to(device)
    images = torch.randn(batch, *cpu_model.input_shape)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for label in ("dense", f"{method} {reduction:.0%}"):
            if label != "dense":
                for m in (cpu_model, model):
                    mambamerge.patch(m, method, reduction=reduction)
            with torch.inference_mode():
                logits = {"cpu": cpu_model(images)}
                for path, impl in paths.items():
                    logits[path] = model.set_scan_impl(impl)(images.to(device)).cpu()
            pairs = [(a, b) for i, a in enumerate(logits) for b in list(logits)[i + 1:]]
            print(f"  {label:>10}: max |logit| {logits['cpu'].abs().max().item():.3f}; max abs diff "
                  + ", ".join(f"{a} vs {b} {(logits[a] - logits[b]).abs().max().item():.2e}" for a, b in pairs))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def throughput(name, paths, args, device, **options):
    """Print one row per path and reduction of model `name` (create_model options) on `device`: images/s
    dense and merged, measured and ideal speed-up."""
    torch.manual_seed(0)
    model = mambamerge.create_model(name, **options).eval().to(device)
    images = torch.randn(args.batch, *model.input_shape, device=device)
    built = reducers(model, args.method, args.reductions)
    dense_flops = flops(model).total_both_directions
    for reduction, red in built.items():
        if isinstance(red, str):
            print(f"  {name} {reduction:.0%}: unreachable: {red}")
    ready = {r: red for r, red in built.items() if not isinstance(red, str)}
    for path, impl in paths.items():
        model.set_scan_impl(impl)
        fns = {"dense": forward_with(model, None, images)}
        fns.update({r: forward_with(model, red, images) for r, red in ready.items()})
        with torch.inference_mode(), autocast(device, args.amp):
            med = time_interleaved(fns, device=device, warmup=args.warmup, runs=args.runs)
        print(f"  {name:<10} {path:<8} {'dense':>6} {args.batch / med['dense']:>9.0f} img/s")
        for reduction, red in ready.items():
            model.token_reducer = red
            ideal = dense_flops / flops(model).total_both_directions
            measured = med["dense"] / med[reduction]
            print(f"  {name:<10} {path:<8} {reduction:>6.0%} {args.batch / med[reduction]:>9.0f} img/s  "
                  f"speed-up {measured:.2f}x, ideal {ideal:.2f}x, measured/ideal {measured / ideal:.2f}")
        mambamerge.unpatch(model)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: this machine has no usable CUDA device (torch.cuda.is_available() is False); "
              "nothing was measured. Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 2
    if args.method not in METHODS:
        raise SystemExit(f"unknown method {args.method!r}; registered: {', '.join(sorted(METHODS))}")
    device = torch.device("cuda")
    check_amp(args.amp, device)
    paths = gpu_paths()
    describe_paths(paths)
    print(f"\nParity (Vim-Ti, random weights, batch {PARITY_BATCH}, float32, TF32 off):")
    parity(MODELS[0], paths, args.method, max(args.reductions), device)
    print(f"\nThroughput (batch {args.batch}, 224x224, inference, amp {args.amp}; medians of {args.runs} "
          f"interleaved runs after {args.warmup} warm-up; ideal = dense / merged FLOPs, both directions, "
          f"merge overhead included):")
    for name in MODELS:
        throughput(name, paths, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
