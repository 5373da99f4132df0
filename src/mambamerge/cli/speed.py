"""`mambamerge speed`: build a model (or load one), report its size and measure its forward throughput."""
import argparse

import torch

from mambamerge.checkpoint import load_checkpoint
from mambamerge.cli.eval import check_at_least_one
from mambamerge.devices import parse_device
from mambamerge.models import create_model, list_models
from mambamerge.ops import mixer_backend
from mambamerge.threads import default_threads, openmp_waiting
from mambamerge.timing import time_call

HELP = "build a model (or load a checkpoint) and measure its forward throughput"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vim_tiny", choices=list_models(), metavar="NAME",
                   help="model to build (default: vim_tiny; see `mambamerge info --models`)")
    p.add_argument("--checkpoint", help="load this checkpoint instead of building a fresh model")
    p.add_argument("--img-size", type=int, default=None,
                   help="image or frame resolution of a Vim or VideoMamba (default: the model's own)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores free at start)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    check_at_least_one(args, "batch", "runs", "img_size", "threads")
    device = parse_device(args.device)
    torch.set_num_threads(default_threads(args.threads))
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, img_size=args.img_size)
        name = args.checkpoint
    else:
        model = create_model(args.model, **({"img_size": args.img_size} if args.img_size is not None else {})).eval()
        name = args.model
    model = model.to(device)
    cfg = model.cfg
    params = sum(p.numel() for p in model.parameters())
    print(f"model        {name}: {cfg.depth} blocks, width {cfg.embed_dim}, d_state {cfg.d_state}")
    print(f"parameters   {params / 1e6:.2f} M")
    print(f"tokens       {model.layout.describe()}, input {tuple(model.input_shape)} per sample")
    print(f"scan         {mixer_backend(device)} on {device}, {torch.get_num_threads()} CPU threads "
          f"({openmp_waiting()})")
    images = torch.randn(args.batch, *model.input_shape, device=device)
    with torch.inference_mode():
        times = time_call(lambda: model(images), device, warmup=1, runs=args.runs)
    best, median = min(times), sorted(times)[len(times) // 2]
    print(f"forward      batch {args.batch}: median {median * 1e3:.0f} ms (best {best * 1e3:.0f} ms), "
          f"{args.batch / median:.1f} inputs/s")
    return 0
