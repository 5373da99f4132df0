"""GPU check of the mixer's CUDA paths (issues 12 and 21): one call prints, section by section, what
docs/performance.md needs from a GPU.

Run from the repository root on a machine with a CUDA GPU (no network needed):
    python benchmarks/gpu_check.py [--budget 360] [--batches 128 1] [--runs 10] [--warmup 3] [--amp bf16]
    python benchmarks/gpu_check.py --cpu-smoke   # every section on the CPU with tiny models: code paths only;
        # with TRITON_INTERPRET=1 the parity section runs the Triton path through Triton's interpreter (the
        # other sections leave it out there: the interpreter takes a minute per forward of the demo model)

1. Paths: GPU, torch, CUDA and Triton versions, and the mixer paths this machine has: "triton" (the Triton
   kernels, ops/triton_scan.py), "fused" (mamba_ssm + causal-conv1d, when both import), "pytorch" (the
   log-depth scan in pure PyTorch).
2. Parity, float32 with TF32 off: logits of a random-weight Vim-Ti (batch 8) on the CPU (its default path)
   and through each GPU path, dense and with MaMe, ToMe and STM at 50%: max abs difference to the CPU.
3. bf16 agreement: the shipped Fashion-MNIST demo Vim on 512 test images, each GPU path under bf16 autocast
   against the CPU in float32: top-1 agreement, dense and merged.
4. Host syncs: every registered method's merged forward on the GPU under
   torch.cuda.set_sync_debug_mode("error"), after one warm-up forward: OK, or the first sync it hit.
5. Throughput: Vim-Ti and Vim-S, 224x224, at each of --batches, inference under --amp autocast, for the
   Triton (and fused) path: images/s dense and with MaMe / ToMe / STM at 50% and 80%, eager and replayed
   as CUDA graphs (medians of --runs interleaved runs after --warmup); the measured speed-up beside the
   ideal one (dense FLOPs / merged FLOPs, both directions, merge overhead included; mambamerge.flops) and
   their ratio; the peak memory of one forward. The log-depth path dense only, for what it costs.

Each section runs in try/except (a failure prints its traceback and the next section runs) and starts
only while the time budget (--budget seconds from the start) lasts, so one failure or a slow section does
not lose the rest. Without a usable CUDA device (and without --cpu-smoke) it says so and exits with status
2, having measured nothing.
"""
import argparse
import contextlib
import copy
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import NamedTuple, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]

import mambamerge  # noqa: E402
from mambamerge import ops  # noqa: E402
from mambamerge.devices import AMP_CHOICES, AMP_DTYPES, check_amp  # noqa: E402
from mambamerge.flops import flops  # noqa: E402
from mambamerge.merge import METHODS  # noqa: E402
from mambamerge.timing import time_interleaved  # noqa: E402
from merge import forward_with  # noqa: E402  (benchmarks/merge.py)

TIMED_METHODS = ("mame", "tome", "stm")
GIB = 2 ** 30


class Setup(NamedTuple):
    """What the sections run on: the device, models (create_model names and options), sizes and timing."""

    device: torch.device
    models: Tuple[str, ...]
    options: dict
    batches: Tuple[int, ...]
    reductions: Tuple[float, ...]
    parity_batch: int
    agreement_images: int
    runs: int
    warmup: int
    amp: str
    smoke: bool


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 1], help="throughput batch sizes")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per configuration (median)")
    parser.add_argument("--warmup", type=int, default=3, help="discarded runs per configuration")
    parser.add_argument("--amp", default="bf16", choices=AMP_CHOICES, help="autocast for the throughput runs")
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.5, 0.8],
                        help="target average reductions in [0, 1) of the merged runs")
    parser.add_argument("--budget", type=float, default=360.0,
                        help="seconds from the start after which no further section or configuration starts")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every section on the CPU with tiny models (checks the code paths, measures nothing)")
    return parser.parse_args(argv)


def setup_from(args) -> Setup:
    if args.cpu_smoke:
        return Setup(torch.device("cpu"), ("vim_pico",), dict(depth=4), (2,), (0.3, 0.8), 2, 8, 1, 0, args.amp, True)
    return Setup(torch.device("cuda"), ("vim_tiny", "vim_small"), {}, tuple(args.batches), tuple(args.reductions),
                 8, 512, args.runs, args.warmup, args.amp, False)


class Budget:
    """Seconds left of --budget, counted from its creation."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def spent(self) -> bool:
        return time.perf_counter() - self.start >= self.seconds


def section(title: str, budget: Budget, fn, *args) -> None:
    """fn(*args) under a heading; skipped once the budget is spent, its failure printed and survived."""
    print(f"\n== {title}", flush=True)
    if budget.spent():
        print(f"   skipped: the time budget of {budget.seconds:.0f} s is spent")
        return
    start = time.perf_counter()
    try:
        fn(*args)
    except Exception:  # noqa: BLE001  (one section's failure must not lose the others)
        print("   FAILED:\n" + textwrap.indent(traceback.format_exc(limit=8), "   "))
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)


def gpu_paths(device: torch.device) -> dict:
    """{name: scan_impl} of the mixer paths this machine can run on `device`, kernels first."""
    paths = {}
    if ops.triton_handles(torch.empty(0, device=device)):
        paths["triton"] = "triton"
    if ops.fused_kernels() is not None:
        paths["fused"] = "fused"
    paths["pytorch"] = "parallel"
    return paths


def beyond_parity(setup: Setup, paths: dict) -> dict:
    """The paths the later sections run: all of them on a GPU; in a CPU smoke run all but the interpreted
    Triton one (at least the log-depth path)."""
    return {p: impl for p, impl in paths.items() if not (setup.smoke and p == "triton")}


def describe(setup: Setup, paths: dict) -> None:
    device = setup.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: nothing is measured)"
    module = ops._triton_scan()
    triton_version = module.triton.__version__ if module is not None else "not importable"
    print(f"   device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton_version}")
    found = {what: fn() is not None for what, fn in (("mamba_ssm", ops._mamba_ssm_fn),
                                                     ("causal_conv1d", ops._causal_conv1d_fn))}
    print("   imports: " + ", ".join(f"{what} {'yes' if ok else 'no'}" for what, ok in found.items()))
    print(f"   paths: {', '.join(paths)}; scan_impl='auto' runs {ops.mixer_backend(device)!r} here")


def patched(model, method, reduction):
    """model patched with `method` at `reduction`, or the reason it cannot be (the model left dense)."""
    mambamerge.unpatch(model)
    if method is None:
        return model
    try:
        return mambamerge.patch(model, method, reduction=reduction)
    except ValueError as err:
        return f"unreachable: {err}"


def amp_context(device: torch.device, amp: str):
    """Autocast for `amp` without the weight-cast cache (which CUDA-graph capture cannot keep), or nothing."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], cache_enabled=False)


@contextlib.contextmanager
def tf32_off():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def merged_rows(reduction):
    return [("dense", None)] + [(f"{method} {reduction:.0%}", method) for method in TIMED_METHODS]


def parity(setup: Setup, paths: dict) -> None:
    """Max abs logit differences to the CPU of each GPU path, float32, dense and merged."""
    torch.manual_seed(0)
    cpu_model = mambamerge.create_model(setup.models[0], **setup.options).eval()
    gpu_model = copy.deepcopy(cpu_model).to(setup.device)
    images = torch.randn(setup.parity_batch, *cpu_model.input_shape, generator=torch.Generator().manual_seed(1))
    print(f"   {setup.models[0]}, random weights, batch {setup.parity_batch}, float32, TF32 off")
    with tf32_off(), torch.inference_mode():
        for label, method in merged_rows(setup.reductions[0]):
            reasons = [r for r in (patched(m, method, setup.reductions[0]) for m in (cpu_model, gpu_model))
                       if isinstance(r, str)]
            if reasons:
                print(f"   {label:>10}: {reasons[0]}")
                continue
            expected = cpu_model(images)
            diffs = {path: (gpu_model.set_scan_impl(impl)(images.to(setup.device)).cpu() - expected).abs().max().item()
                     for path, impl in paths.items()}
            print(f"   {label:>10}: max |logit| {expected.abs().max().item():.3f}; max abs diff to the CPU: "
                  + ", ".join(f"{path} {diff:.2e}" for path, diff in diffs.items()))


def agreement(setup: Setup, paths: dict) -> None:
    """Top-1 agreement with the CPU in float32 of each GPU path under bf16 autocast, on the demo model."""
    from mambamerge.cli.demo import demo_checkpoint
    from mambamerge.data import load_dataset

    paths = beyond_parity(setup, paths)
    cpu_model = mambamerge.load_checkpoint(demo_checkpoint("image"))
    gpu_model = copy.deepcopy(cpu_model).to(setup.device)
    data = load_dataset("fashion-mnist", "test", limit=setup.agreement_images, input_shape=cpu_model.input_shape)
    images = torch.stack([data[i][0] for i in range(len(data))])
    print(f"   the Fashion-MNIST demo Vim, {len(images)} test images: CPU float32 vs GPU bf16 autocast")
    with torch.inference_mode():
        for label, method in merged_rows(setup.reductions[0]):
            reasons = [r for r in (patched(m, method, setup.reductions[0]) for m in (cpu_model, gpu_model))
                       if isinstance(r, str)]
            if reasons:
                print(f"   {label:>10}: {reasons[0]}")
                continue
            expected = cpu_model(images).argmax(dim=1)
            agree = {}
            for path, impl in paths.items():
                with amp_context(setup.device, "bf16"):
                    got = gpu_model.set_scan_impl(impl)(images.to(setup.device)).argmax(dim=1).cpu()
                agree[path] = (got == expected).float().mean().item()
            print(f"   {label:>10}: top-1 agreement " + ", ".join(f"{p} {a:.2%}" for p, a in agree.items()))


@contextlib.contextmanager
def syncs_are_errors(device: torch.device):
    """torch.cuda.set_sync_debug_mode("error") on a GPU (a host sync raises), nothing on the CPU."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def host_syncs(setup: Setup) -> None:
    """Each method's merged forward on the device with syncs made errors: OK or the first sync's message."""
    torch.manual_seed(0)
    model = mambamerge.create_model(setup.models[0], **setup.options).eval().to(setup.device)
    images = torch.randn(2, *model.input_shape, device=setup.device)
    for method in sorted(METHODS):
        reduction = next((r for r in (0.5, 0.3, 0.1) if not isinstance(patched(model, method, r), str)), None)
        if reduction is None:
            print(f"   {method:<15} cannot reach 10% on this model")
            continue
        with torch.inference_mode():
            model(images)  # warm-up: kernels compiled, per-method state moved to the device
            try:
                with syncs_are_errors(setup.device):
                    model(images)
                    if setup.device.type == "cuda":
                        torch.cuda.current_stream(setup.device).synchronize()  # (explicit: allowed)
                verdict = "OK, no host sync"
            except RuntimeError as err:
                verdict = f"SYNC: {str(err).splitlines()[0]}"
        print(f"   {method:<15} {reduction:.0%}: {verdict}")
    mambamerge.unpatch(model)


def captured(fn, device: torch.device):
    """fn replayed as a CUDA graph: run twice on a side stream, captured, returned as the graph's replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def peak_gib(fn, device: torch.device) -> str:
    if device.type != "cuda":
        return "peak n/a on CPU"
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return f"peak {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB"


def throughput(setup: Setup, paths: dict, budget: Budget) -> None:
    """Rows of images/s, speed-ups against the ideal, and peak memory; see the module docstring (5)."""
    device = setup.device
    paths = beyond_parity(setup, paths)
    kernel_paths = {p: impl for p, impl in paths.items() if p != "pytorch"} or paths  # (smoke: the log-depth one)
    print(f"   224x224 (tiny models: their own size), inference, amp {setup.amp}; medians of {setup.runs} "
          f"interleaved runs after {setup.warmup} warm-up; ideal = dense FLOPs / merged FLOPs")
    for name in setup.models:
        torch.manual_seed(0)
        model = mambamerge.create_model(name, **setup.options).eval().to(device)
        dense_flops = flops(model).total_both_directions
        configs = {}
        for reduction in setup.reductions:
            for method in TIMED_METHODS:
                result = patched(model, method, reduction)
                if isinstance(result, str):
                    print(f"   {name:<10} {method} {reduction:.0%}: {result.splitlines()[0][:150]}")
                    continue
                configs[f"{method} {reduction:.0%}"] = (model.token_reducer,
                                                        dense_flops / flops(model).total_both_directions)
        mambamerge.unpatch(model)
        for batch in setup.batches:
            if budget.spent():
                print(f"   {name} batch {batch}: skipped, the time budget of {budget.seconds:.0f} s is spent")
                continue
            images = torch.randn(batch, *model.input_shape, device=device)
            for path, impl in kernel_paths.items():
                model.set_scan_impl(impl)
                fns = {"dense": forward_with(model, None, images)}
                fns.update({label: forward_with(model, reducer, images) for label, (reducer, _) in configs.items()})
                measured = {"eager": contextual(fns, device, setup.amp)}
                if device.type == "cuda":
                    measured["graph"] = {label: captured(fn, device) for label, fn in measured["eager"].items()}
                for mode, calls in measured.items():
                    med = time_interleaved(calls, device=device, warmup=setup.warmup, runs=setup.runs)
                    for label, seconds in med.items():
                        row = f"   {name:<10} b{batch:<4} {path:<7} {mode:<5} {label:>9} {batch / seconds:>9.0f} img/s"
                        if label != "dense":
                            speedup, ideal = med["dense"] / seconds, configs[label][1]
                            row += f"  speed-up {speedup:.2f}x, ideal {ideal:.2f}x, measured/ideal {speedup / ideal:.2f}"
                        print(row + ("  " + peak_gib(calls[label], device) if mode == "eager" else ""), flush=True)
                del measured
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            model.set_scan_impl("parallel")
            dense = contextual({"dense": forward_with(model, None, images)}, device, setup.amp)["dense"]
            med = time_interleaved({"dense": dense}, device=device, warmup=1, runs=max(1, setup.runs // 3))
            print(f"   {name:<10} b{batch:<4} pytorch eager     dense {batch / med['dense']:>9.0f} img/s  "
                  f"(log-depth scan)  {peak_gib(dense, device)}", flush=True)
            model.set_scan_impl("auto")


def contextual(fns: dict, device: torch.device, amp: str) -> dict:
    """Each fn run under inference mode and `amp` autocast (entered at every call, as a graph capture needs)."""
    def wrap(fn):
        def run():
            with torch.inference_mode(), amp_context(device, amp):
                return fn()
        return run
    return {label: wrap(fn) for label, fn in fns.items()}


def main(argv=None):
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: this machine has no usable CUDA device (torch.cuda.is_available() is False); "
              "nothing was measured. Run it on a machine with an NVIDIA GPU, or pass --cpu-smoke to check its "
              "code paths on the CPU.", file=sys.stderr)
        return 2
    setup = setup_from(args)
    check_amp(setup.amp, setup.device)
    budget = Budget(args.budget)
    paths = gpu_paths(setup.device)
    section("1. paths", budget, describe, setup, paths)
    section("2. parity with the CPU, float32", budget, parity, setup, paths)
    section("3. bf16 autocast: top-1 agreement with the CPU in float32", budget, agreement, setup, paths)
    section("4. host syncs in the merged forward (torch.cuda.set_sync_debug_mode('error'))", budget, host_syncs,
            setup)
    section("5. throughput", budget, throughput, setup, paths, budget)
    print(f"\ngpu_check: done in {time.perf_counter() - budget.start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
