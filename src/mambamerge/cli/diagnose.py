"""`mambamerge diagnose`: what the scans of a checkpoint do and what its tokens are worth; writes
DIR/diagnostics.json, DIR/summary.txt and one PNG per diagnostic, all at the end."""
import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Sequence, Tuple

from mambamerge.cli.inputs import open_data
from mambamerge.cli.names import DIAGNOSTIC_PARTS as PARTS
from mambamerge.cli.options import add_source, check_at_least_one

if TYPE_CHECKING:
    import torch

HELP = ("diagnose a checkpoint: decay kernels, implicit attention, sequential dependence, token order, "
        "leave-one-out token worth against Δ statistics, prune vs merge")
EXAMPLES = ("--checkpoint model.safetensors --data fashion-mnist --out outputs/diagnose",
            "--checkpoint model.safetensors --data fsdd --parts decay importance --out outputs/diagnose-audio",
            "--checkpoint vim_t_midclstok_76p1acc.pth --data imagenet/val --images 64 --out outputs/vim-t")


def add_inputs(p: argparse.ArgumentParser, default_count: int) -> None:
    """Arguments shared with `mambamerge visualize`: checkpoint, data and which inputs."""
    add_source(p)
    p.add_argument("--split", help="test (default: shipped with mambamerge), train, or val (fsdd and moving-*) for the "
                                   "named data sets; settings chosen from these numbers should come from train or val")
    p.add_argument("--first", type=int, default=0, metavar="I",
                   help="inputs before this one (file order) are left out (default 0)")
    p.add_argument("--images", type=int, default=default_count, metavar="N",
                   help=f"number of inputs: images, clips or spectrograms, round-robin over the classes in file "
                        f"order (default {default_count})")
    p.add_argument("--img-size", type=int, metavar="PIXELS", help="image or frame size (default: the checkpoint's)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores free at start)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the outputs (created if needed)")


def add_parser(p: argparse.ArgumentParser) -> None:
    add_inputs(p, default_count=256)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, metavar="PART",
                   help=f"diagnostics to run (default: all: {', '.join(PARTS)})")
    p.add_argument("--loo-images", type=int, default=16, metavar="N",
                   help="images of the leave-one-out study, the costly part (default 16)")
    p.add_argument("--loo-blocks", nargs="+", type=int, metavar="B",
                   help="blocks before which tokens are left out (default: every second block from 1)")
    p.add_argument("--attention-blocks", nargs="+", type=int, metavar="B",
                   help="blocks whose implicit attention and one-block dependence are drawn (default: first, "
                        "middle, last)")
    p.add_argument("--reductions", nargs="+", type=float, default=[0.2, 0.4, 0.6], metavar="R",
                   help="target reductions of the prune-vs-merge comparison (default 0.2 0.4 0.6)")


def load_batch(args: argparse.Namespace, check: Callable[["torch.nn.Module"], None]
               ) -> Tuple["torch.nn.Module", "torch.Tensor", "torch.Tensor", str]:
    """(model in eval mode, inputs (N, *model.input_shape), labels (N,), a label of the data) from the shared
    arguments, loaded as `mambamerge eval` loads them (cli.inputs.open_data): images, clips or spectrograms;
    `check` is called with the model before any data is read."""
    import torch

    from mambamerge.data import batches
    from mambamerge.data.datasets import SUBSET_RULE
    from mambamerge.threads import default_threads

    check_at_least_one(args, "images", "img_size", "threads")
    if args.first < 0:
        raise ValueError(f"--first must be >= 0, got {args.first}")
    torch.set_num_threads(default_threads(args.threads))
    model, dataset, label = open_data(args, default_split="test", limit=args.images, start=args.first, check=check)
    chosen = f"{label}, {len(dataset)} inputs from #{args.first} ({SUBSET_RULE})"
    read = list(batches(dataset, len(dataset)))
    if not read:
        raise ValueError(f"{chosen}: none could be read")
    inputs, labels = read[0]
    return model.eval(), inputs, labels, chosen


def check_reachable(model, configs: Dict[str, dict], reductions: Sequence[float], flag: str) -> None:
    """Each {label: {"method": name, **options}} at each target reduction resolved for `model` (which
    is only read; no input runs), so that one it cannot reach is refused before any work, naming the
    command-line `flag` that asked for it."""
    from mambamerge.patch import make_reducer

    for label, config in configs.items():
        options = {k: v for k, v in config.items() if k != "method"}
        for reduction in reductions:
            try:
                make_reducer(model, config["method"], reduction=reduction or None, **options)
            except ValueError as err:
                raise ValueError(f"{flag} {reduction:g}: {label} cannot reach it on this {len(model.layers)}-block "
                                 f"model ({err}); lower {flag}") from None


def _finite(value):
    """JSON-ready: tensors to lists, non-finite floats to None (an effective length beyond the lags)."""
    import torch

    if isinstance(value, torch.Tensor):
        return _finite(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    from mambamerge.atomic import write_files
    from mambamerge.diagnostics.report import Settings, diagnose
    from mambamerge.results import check_writable, environment

    check_at_least_one(args, "loo_images")
    for reduction in args.reductions:
        if not 0.0 <= reduction < 1.0:
            raise ValueError(f"--reductions must be in [0, 1), got {reduction}")
    out = check_writable(args.out, create=False)  # created when the results are written: a refused run leaves none
    settings = Settings(parts=args.parts, loo_blocks=args.loo_blocks, attention_blocks=args.attention_blocks,
                        loo_images=args.loo_images, reductions=args.reductions)

    def check(model):
        settings.resolve(len(model.layers))
        if "prune_vs_merge" in settings.parts:
            check_reachable(model, settings.prune_configs, settings.reductions, "--reductions")

    model, inputs, labels, data = load_batch(args, check)
    report = diagnose(model, inputs, labels, settings, title=Path(args.checkpoint).stem)
    header = [f"mambamerge diagnose: {Path(args.checkpoint).name} on {data}", ""]
    payload = {"checkpoint": str(args.checkpoint), "data": data, "model": model.cfg.to_dict(),
               "environment": environment(next(model.parameters()).device), **report.numbers}
    text = "\n".join(header + report.summary) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_files(out, {"diagnostics.json": json.dumps(_finite(payload), indent=1) + "\n", "summary.txt": text,
                      **report.figures})
    print(text, end="")
    print(f"wrote {', '.join(['diagnostics.json', 'summary.txt', *report.figures])} to {out}")
    return 0
