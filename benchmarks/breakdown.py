"""Where a dense Vim forward spends its time on CPU: projections, convolution (with its SiLU in the
kernel), step-size softplus, selective scan, output gate (kernel), norms, and the rest (residual adds,
embedding, head; on the torch path also the convolution's SiLU and the gate), per forward and as
shares, measured on the per-step kernels (scan_impl "compiled"; the whole-mixer kernel that "auto" runs
does the same work in one call per block, which hooks cannot see into); then the whole forward with the
whole-mixer kernel, the per-step kernels and torch's operations, and the whole-mixer kernel with bf16
products under bf16 autocast (where torch exports MKL's bf16 gemm), timed interleaved.

Run: .venv/bin/python benchmarks/breakdown.py [--model vim_tiny] [--batch 8] [--threads 2] [--runs 5]
"""
import argparse
import statistics
import time
import types
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

import mambamerge
import mambamerge.models.mixer as mixer_module
from mambamerge.models.blocks import RMSNorm
from mambamerge.ops import cpu_kernels
from mambamerge.timing import time_interleaved

PARTS = ("projections", "convolution", "softplus", "scan", "gate", "norms", "other")


class PartClock:
    """Seconds spent in each part of the forward, accumulated by wrapping the mixer's functions and by
    forward hooks on the linear and norm layers (CPU work is synchronous, so wall-clock deltas are exact)."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def timed(self, part, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
        return wrapper

    @contextmanager
    def attached(self, model):
        starts = {}

        def pre(module, args):
            starts[id(module)] = time.perf_counter()

        def post_for(part):
            def post(module, args, output):
                self.seconds[part] += time.perf_counter() - starts.pop(id(module))
            return post

        handles = []
        for module in model.modules():
            part = "projections" if isinstance(module, nn.Linear) else "norms" if isinstance(
                module, (RMSNorm, nn.LayerNorm)) else None
            if part is not None:
                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post_for(part))]
        kernels = mixer_module.cpu_kernels
        originals = {name: getattr(mixer_module, name) for name in ("softplus", "softplus_with_row_mean",
                                                                      "selective_scan", "depthwise_conv_along_sequence")}
        if hasattr(kernels, "conv_silu"):
            mixer_module.cpu_kernels = types.SimpleNamespace(
                handles=kernels.handles, conv_silu=self.timed("convolution", kernels.conv_silu),
                gate=self.timed("gate", kernels.gate))
        mixer_module.softplus = self.timed("softplus", originals["softplus"])
        mixer_module.softplus_with_row_mean = self.timed("softplus", originals["softplus_with_row_mean"])
        mixer_module.selective_scan = self.timed("scan", originals["selective_scan"])
        mixer_module.depthwise_conv_along_sequence = self.timed("convolution",
                                                                originals["depthwise_conv_along_sequence"])
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            mixer_module.cpu_kernels = kernels
            for name, fn in originals.items():
                setattr(mixer_module, name, fn)


def breakdown(model, images, runs):
    """{part: median ms per forward} over `runs` forwards, and the median total ms."""
    per_run, totals = [], []
    with torch.inference_mode():
        model(images)
        for _ in range(runs):
            clock = PartClock()
            with clock.attached(model):
                start = time.perf_counter()
                model(images)
                total = time.perf_counter() - start
            parts = dict(clock.seconds)
            parts["other"] = total - sum(parts.values())
            per_run.append(parts)
            totals.append(total)
    return {part: 1e3 * statistics.median(r.get(part, 0.0) for r in per_run) for part in PARTS}, \
        1e3 * statistics.median(totals)


@contextmanager
def torch_path():
    """The mixers convolve and gate with torch's operations instead of the kernels, while the block runs."""
    kernels = mixer_module.cpu_kernels
    mixer_module.cpu_kernels = types.SimpleNamespace(handles=lambda x: False)
    try:
        yield
    finally:
        mixer_module.cpu_kernels = kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vim_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mambamerge.create_model(args.model).eval()
    images = torch.randn(args.batch, *model.input_shape)
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, dense, inference")
    model.set_scan_impl("compiled")
    for label, context in (("per-step kernels", nullcontext), ("torch path", torch_path)):
        with context():
            parts, total = breakdown(model, images, args.runs)
        print(f"\n{label}: {total:.1f} ms per forward ({1e3 * args.batch / total:.1f} inputs/s)")
        for part in PARTS:
            print(f"  {part:<20} {parts[part]:8.1f} ms  {100 * parts[part] / total:5.1f}%")

    def forward(impl, context=nullcontext):
        def run():
            model.set_scan_impl(impl)
            with context(), torch.inference_mode():
                return model(images)
        return run

    paths = {"whole-mixer kernel": forward("auto"), "per-step kernels": forward("compiled"),
             "torch path": forward("compiled", torch_path)}
    if cpu_kernels.bf16_mixer_available():
        paths["whole-mixer, bf16"] = forward("auto", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    times = time_interleaved(paths, runs=args.runs)
    print("\nwhole forward, timed interleaved:")
    for label, seconds in times.items():
        print(f"  {label:<20} {1e3 * seconds:8.1f} ms  {args.batch / seconds:6.1f} inputs/s  "
              f"{times['torch path'] / seconds:5.2f}x the torch path")


if __name__ == "__main__":
    main()
