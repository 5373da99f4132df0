"""`mambamerge diagnose`: what the scans of a checkpoint do and what its tokens are worth; writes
DIR/diagnostics.json, DIR/summary.txt and one PNG per diagnostic, all at the end."""
import argparse
import json
import math
from pathlib import Path
from typing import Tuple

import torch

from mambamerge.atomic import write_files
from mambamerge.checkpoint import load_checkpoint
from mambamerge.data import IDX_SETS, IdxDataset, load_dataset
from mambamerge.diagnostics.report import PARTS, Settings, diagnose
from mambamerge.evaluate import check_fit
from mambamerge.results import check_writable, environment

HELP = ("diagnose a checkpoint: decay kernels, implicit attention, sequential dependence, token order, "
        "leave-one-out token worth against Δ statistics, prune vs merge")


def add_inputs(p: argparse.ArgumentParser, default_images: int) -> None:
    """Arguments shared with `mambamerge visualize`: checkpoint, data and which images."""
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model checkpoint (.safetensors or .pth)")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="fashion-mnist or mnist (optionally NAME:/folder/with/idx/files), or an image folder")
    p.add_argument("--split", default="train",
                   help="train or test for fashion-mnist and mnist (default: train; settings chosen from these "
                        "numbers must not come from the test split)")
    p.add_argument("--first", type=int, default=0, metavar="I",
                   help="index of the first image used (default 0; e.g. 55000 for the held-out MNIST images)")
    p.add_argument("--images", type=int, default=default_images, metavar="N",
                   help=f"number of images (default {default_images})")
    p.add_argument("--img-size", type=int, metavar="PIXELS", help="resolution (default: the checkpoint's)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the outputs (created if needed)")


def add_parser(p: argparse.ArgumentParser) -> None:
    add_inputs(p, default_images=256)
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


def load_images(args: argparse.Namespace) -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """(model in eval mode, images (N, C, H, W), labels (N,), a label of the data) from the shared arguments."""
    for name in ("images", "img_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.first < 0:
        raise ValueError(f"--first must be >= 0, got {args.first}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint, img_size=args.img_size).eval()
    if len(model.layout.grid) != 2:
        raise ValueError(f"{Path(args.checkpoint).name} is not an image model ({model.layout.describe()}); the "
                         f"commands read image data so far: use the library functions in mambamerge.diagnostics")
    height, width = model.cfg.img_size
    if height != width:
        raise ValueError(f"{Path(args.checkpoint).name} runs at {height}x{width} images but datasets are loaded "
                         f"square; pass --img-size N")
    is_idx = args.data.partition(":")[0] in IDX_SETS
    dataset = load_dataset(args.data, args.split, img_size=height, in_chans=model.cfg.in_chans,
                           limit=args.first + args.images)
    label = f"{args.data} {args.split}" if is_idx else args.data
    check_fit(model, dataset.info, label)
    if len(dataset) <= args.first:
        raise ValueError(f"{label} holds {len(dataset)} images; --first {args.first} is past its end")
    index = list(range(args.first, len(dataset)))
    if isinstance(dataset, IdxDataset):
        images, labels = dataset.batch(index)
    else:
        pairs = [dataset[i] for i in index]
        images, labels = torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])
    return model, images, labels, f"{label} images {args.first}..{args.first + len(index) - 1}"


def _finite(value):
    """JSON-ready: tensors to lists, non-finite floats to None (an effective length beyond the lags)."""
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
    if args.loo_images < 1:
        raise ValueError(f"--loo-images must be at least 1, got {args.loo_images}")
    for reduction in args.reductions:
        if not 0.0 <= reduction < 1.0:
            raise ValueError(f"--reductions must be in [0, 1), got {reduction}")
    out = check_writable(args.out)
    model, images, labels, data = load_images(args)
    settings = Settings(parts=args.parts, loo_blocks=args.loo_blocks, attention_blocks=args.attention_blocks,
                        loo_images=args.loo_images, reductions=args.reductions)
    report = diagnose(model, images, labels, settings, title=Path(args.checkpoint).stem)
    header = [f"mambamerge diagnose: {Path(args.checkpoint).name} on {data}", ""]
    payload = {"checkpoint": str(args.checkpoint), "data": data, "model": model.cfg.to_dict(),
               "environment": environment(next(model.parameters()).device), **report.numbers}
    text = "\n".join(header + report.summary) + "\n"
    write_files(out, {"diagnostics.json": json.dumps(_finite(payload), indent=1) + "\n", "summary.txt": text,
                      **report.figures})
    print(text, end="")
    print(f"wrote {', '.join(['diagnostics.json', 'summary.txt', *report.figures])} to {out}")
    return 0
