"""The whole-mixer kernel's projections of a few rows on its own few_rows loop against sgemm_: the kernel
library built twice from this source, as it is and with kFewRows = kFewRowsSmall = 0 (every projection
on sgemm_), both loaded in one process; every block of a model at a few lengths (so that their weights
come from memory as in a forward), then merged forwards (whose logits the two builds must agree on),
timed interleaved, with the ratio few_rows / sgemm_.

Run: .venv/bin/python benchmarks/few_rows.py [--models vim_tiny vim_nano] [--lengths 1 2 4 8 12 16]
     [--methods mame tome] [--reductions 0.5 0.8] [--batch 1] [--runs 15] [--threads 1]
"""
import argparse
import ctypes
import re
import tempfile
from pathlib import Path

import torch

import mambamerge
from mambamerge.ops.cpu_kernels import build, library
from mambamerge.timing import time_interleaved

_FEW_ROWS = re.compile(r"constexpr int64_t (kFewRows|kFewRowsSmall) = (\d+);")


def build_variant(source: str, folder: Path, few_rows: bool) -> ctypes.CDLL:
    """The library compiled from `source`, or with kFewRows and kFewRowsSmall 0 unless `few_rows`, bound as
    library.py binds it."""
    src, obj, so = (folder / f"few{int(few_rows)}{ext}" for ext in (".cpp", ".o", ".so"))
    src.write_text(source if few_rows else _FEW_ROWS.sub(r"constexpr int64_t \1 = 0;", source))
    build._run(["g++", *build.COMPILE_FLAGS, "-c", str(src), "-o", str(obj)])
    build._run(["g++", *build.LINK_FLAGS, str(obj), "-o", str(so), *build.LIBS])
    lib = ctypes.CDLL(str(so))
    library._bind(lib)
    return lib


def on(lib: ctypes.CDLL, fn):
    """fn run with `lib` as the process's kernel library."""
    launcher = library.loaded().launcher

    def run():
        library._loaded = library.Loaded(lib, launcher, None)
        with torch.inference_mode():
            fn()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vim_tiny", "vim_nano"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1, 2, 4, 8, 12, 16])
    parser.add_argument("--methods", nargs="+", default=["mame", "tome"])
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.5, 0.8])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = build.SOURCE.read_text()
    limits = dict(_FEW_ROWS.findall(source))
    if not library.available() or len(limits) != 2:
        raise SystemExit(f"needs the kernel library with its few_rows loop: {library.unavailable_reason()}")
    original = library.loaded()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"few_rows": build_variant(source, Path(tmp), True), "sgemm_": build_variant(source, Path(tmp), False)}
        print(f"CPU, {args.threads} threads, batch {args.batch}, float32 inference; few_rows up to "
              f"{limits['kFewRowsSmall']} rows of a small weight, {limits['kFewRows']} of a large one; medians of "
              f"{args.runs} interleaved runs")
        try:
            for name in args.models:
                torch.manual_seed(0)
                model = mambamerge.create_model(name).eval()
                dim = model.cfg.embed_dim
                print(f"\n== {name}: every block at L tokens, us per block")
                for length in args.lengths:
                    hidden, residual = torch.randn(args.batch, length, dim), torch.randn(args.batch, length, dim)

                    def blocks():
                        for block in model.layers:
                            block(hidden, residual)
                    us = {k: 1e6 * v / len(model.layers) for k, v in
                          time_interleaved({k: on(lib, blocks) for k, lib in libs.items()}, runs=args.runs).items()}
                    print(f"  L={length:<3} few_rows {us['few_rows']:7.1f}  sgemm_ {us['sgemm_']:7.1f}  "
                          f"ratio {us['few_rows'] / us['sgemm_']:.3f}")
                print(f"== {name}: merged forwards, ms")
                images = torch.randn(args.batch, *model.input_shape)
                for method in args.methods:
                    for reduction in args.reductions:
                        mambamerge.patch(model, method, reduction=reduction)
                        logits = {}
                        for k, lib in libs.items():
                            on(lib, lambda: logits.__setitem__(k, model(images)))()
                        gap = (logits["few_rows"] - logits["sgemm_"]).abs().max().item()
                        if not gap <= 1e-4 * max(1.0, logits["sgemm_"].abs().max().item()):
                            raise SystemExit(f"{name} {method} {reduction:.0%}: the two builds' logits differ by {gap}")
                        ms = {k: 1e3 * v for k, v in time_interleaved(
                            {k: on(lib, lambda: model(images)) for k, lib in libs.items()}, runs=args.runs).items()}
                        mambamerge.unpatch(model)
                        print(f"  {method:<7} {reduction:.0%}  few_rows {ms['few_rows']:8.2f}  sgemm_ {ms['sgemm_']:8.2f}  "
                              f"ratio {ms['few_rows'] / ms['sgemm_']:.3f}")
        finally:
            library._loaded = original


if __name__ == "__main__":
    main()
