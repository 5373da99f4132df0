"""The options several commands share (what to load, the device, the method and its schedule) and their
checks; torch is imported inside the functions that run a model, so that `--help` stays instant."""
import argparse
import ast
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from mambamerge.cli.names import AMP_CHOICES, METHODS

if TYPE_CHECKING:
    import torch


def add_source(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --data: the model and the inputs it is run on."""
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model checkpoint (.safetensors or .pth)")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="what the model takes: fashion-mnist or mnist (images), moving-fashion-mnist or moving-mnist "
                        "(clips), fsdd (spoken digits), each optionally NAME:/folder/with/its/files, or a folder "
                        "<folder>/<class name>/<inputs> of images, clips or sound files")


def add_common(p: argparse.ArgumentParser) -> None:
    """Arguments shared by eval and sweep: what to load and how to measure."""
    add_source(p)
    p.add_argument("--split", help="train or test (default: test), also val for fsdd and moving-*; a folder is one "
                                   "split already")
    p.add_argument("--limit", type=int, metavar="N",
                   help="evaluate on N inputs only: round-robin over the classes in file order (every class is "
                        "reached; the same N for every method and run)")
    p.add_argument("--img-size", type=int, metavar="PIXELS",
                   help="resolution to evaluate at (default: the checkpoint's training resolution, else 224)")
    p.add_argument("--batch-size", "--batch", type=int, default=64, metavar="N",
                   help="batch size of the accuracy pass (default: 64)")
    p.add_argument("--throughput-batch", type=int, default=8, help="batch size of the timed forwards (default: 8)")
    p.add_argument("--runs", type=int, default=5, help="timed forwards per throughput, median (default: 5)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores free at start)")
    add_device_options(p)
    add_compile_option(p)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule parameter or method option, as for mambamerge.patch, e.g. --option every=1 "
                        "--option match=window; repeatable")


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--device, --amp and --workers, shared by every command that runs a model on data."""
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda or cuda:N; under torchrun, cuda gives each process its own GPU")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="autocast precision: none (default), bf16 (CPU or GPU), fp16 (GPU)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="DataLoader processes decoding image folders (default: "
                        "min(8, CPU cores per process - 1))")


def add_compile_option(p: argparse.ArgumentParser) -> None:
    """--compile, shared by the commands that time forwards."""
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile'd forwards (mambamerge.compile; an accuracy pass stays eager); each "
                        "compile is timed apart from the runs, and inductor caches it for later runs")


def compile_line(compile_s: Dict[str, float]) -> str:
    """The report line of --compile: each forward's compile seconds and where torch caches the code."""
    from mambamerge.compiling import cache_dir

    times = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in compile_s.items())
    return f"torch.compile (inductor), first calls not timed: {times}; cache {cache_dir()}"


def default_workers(requested: Optional[int]) -> int:
    """--workers, or min(8, this machine's cores per torchrun process - 1) when not given."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--workers must be 0 or more, got {requested}")
        return requested
    from mambamerge.distributed import world

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores // world().local_size - 1))


def setup_device(args: argparse.Namespace) -> "torch.device":
    """The device of this process (joining torchrun's process group when there is one), with --amp
    checked against it."""
    from mambamerge import distributed
    from mambamerge.devices import check_amp, parse_device

    device = distributed.setup(parse_device(args.device))
    check_amp(args.amp, device)
    return device


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="a configuration `mambamerge tune` chose (DIR/config_<R>.json): its method, options and "
                        "per-block schedule")


def read_config(path: Optional[str]) -> Optional[dict]:
    """The tune configuration at --config (None when not given); a ValueError naming the file when it is
    missing or not JSON."""
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file (mambamerge tune writes DIR/config_<R>.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path} is not a tune configuration (JSON): {err}") from None


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    """A ValueError naming the flag when one of the count arguments `names` was given below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_common(args: argparse.Namespace) -> Dict[str, object]:
    """Validate the shared numbers; returns the parsed --option pairs."""
    check_at_least_one(args, "batch_size", "throughput_batch", "runs", "limit", "img_size", "threads")
    return parse_options(args.option)


def parse_options(pairs) -> Dict[str, object]:
    """--option KEY=VALUE pairs as a dict, values read as Python literals where they are ones."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE (e.g. every=1), got {pair!r}")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


def check_method(method: str, options: Dict[str, object]) -> None:
    """mambamerge.patch's errors that need no model (unknown method or option, an option value of the
    wrong kind, a schedule parameter out of range), raised before any data is read."""
    from mambamerge.patch import check_options

    check_options(method, **options)


def add_method_options(p: argparse.ArgumentParser) -> None:
    """--method, --reduction and --option of eval and speed."""
    p.add_argument("--method", metavar="NAME",
                   help=f"token-reduction method: {', '.join(METHODS)}, or none for the dense model "
                        f"(default: the one a fine-tuned checkpoint records, else none)")
    p.add_argument("--reduction", type=float, metavar="R", help="target average reduction in [0, 1), e.g. 0.4")


def check_method_args(args: argparse.Namespace, options: Dict[str, object]) -> None:
    """--method (a name or none), --reduction and the --option pairs agree with each other."""
    if args.method in (None, "none") and (args.reduction is not None or options):
        raise ValueError("--reduction and --option need --method NAME")
    if args.method not in (None, "none"):
        check_method(args.method, options)
        if args.reduction is None and "r" not in options and "keep" not in options \
                and not isinstance(options.get("schedule"), (list, tuple)):
            raise ValueError("--method needs --reduction R (e.g. 0.4), --option r=N (N tokens before every block, "
                             "as ToMe), --option keep=K or --option schedule=[per-block counts]")
    if args.reduction is not None:
        check_reduction(args.reduction)


def check_reduction(reduction: float) -> None:
    if not 0.0 <= reduction < 1.0:
        raise ValueError(f"reductions must be in [0, 1) (fraction of token-layers removed), got {reduction}")
