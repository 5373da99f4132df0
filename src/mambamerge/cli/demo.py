"""`mambamerge demo`: the README's main job. The sweep of every method at 20/40/60/80% average
reduction on the demo model shipped with the package (a Vim trained by this project on
Fashion-MNIST, 14x14 patches + middle class token like ImageNet Vim) and the shipped test split."""
import argparse
from importlib import resources
from pathlib import Path

from mambamerge.cli import sweep

HELP = "sweep every method on the shipped demo model and Fashion-MNIST test images (the README's main job)"
DEMO_CHECKPOINT = "vim_nano_fmnist.safetensors"


def demo_checkpoint() -> Path:
    path = Path(str(resources.files("mambamerge") / "assets" / DEMO_CHECKPOINT))
    if not path.is_file():
        raise FileNotFoundError(f"the demo checkpoint {path} is missing from the installation; reinstall the "
                                f"package or pass a checkpoint to `mambamerge sweep --checkpoint`")
    return path


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs/demo", metavar="DIR", help="results folder (default: outputs/demo)")
    p.add_argument("--limit", type=int, default=2000, metavar="N",
                   help="test images to evaluate (default: 2000 of the 10,000)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores free at start)")


def run(args: argparse.Namespace) -> int:
    argv = ["--checkpoint", str(demo_checkpoint()), "--data", "fashion-mnist", "--limit", str(args.limit),
            "--out", args.out]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    parser = argparse.ArgumentParser(prog="mambamerge sweep")
    sweep.add_parser(parser)
    return sweep.run(parser.parse_args(argv))
