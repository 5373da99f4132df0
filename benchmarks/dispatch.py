"""What the torch custom ops cost in eager inference: a Vim-Ti forward with every compiled-kernel call
going through torch.ops.mambamerge (the dispatcher, as under torch.compile or autograd) beside the
same forward as shipped (eager inference calls the kernels directly, cpu_kernels.registration.dispatch),
round-robin in one process, CPU time of the process (less sensitive to a loaded machine than wall time).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dispatch.py [--batch 1] [--runs 10] [--method mame]
"""
import argparse
import statistics
import time

import torch

import mambamerge
from mambamerge.ops.cpu_kernels import merge, registration, scan, softplus


def through_ops(op, impl, args, differentiable=()):
    return op(*args)


def set_dispatch(dispatch):
    """The dispatch every kernel module calls its kernels through."""
    for module in (merge, scan, softplus):
        module.dispatch = dispatch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--method", default=None, help="a reduction method at 50%% average reduction (default: dense)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mambamerge.create_model("vim_tiny").eval()
    if args.method:
        mambamerge.patch(model, args.method, reduction=0.5)
    images = torch.randn(args.batch, 3, 224, 224)
    variants = {"custom ops": through_ops, "shipped": registration.dispatch}
    times = {name: [] for name in variants}
    outputs = {}
    with torch.inference_mode():
        for run in range(args.runs + 1):  # the first round warms up
            for name, dispatch in variants.items():
                set_dispatch(dispatch)
                start = time.process_time()
                outputs[name] = model(images)
                if run:
                    times[name].append(time.process_time() - start)
    set_dispatch(variants["shipped"])
    median = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"Vim-Ti, batch {args.batch}, {args.method or 'dense'}, {args.runs} runs: median CPU ms "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in median.items())
          + f"; custom ops / shipped {median['custom ops'] / median['shipped']:.3f}; outputs equal: "
          + str(torch.equal(outputs["custom ops"], outputs["shipped"])))


if __name__ == "__main__":
    main()
