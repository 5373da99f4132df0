"""`mambamerge demo [image|audio|video]`: the sweep of every method at 20/40/60/80% average reduction
on a demo model shipped with the package, on test data shipped with it.

- image (the README's main job): a Vim trained by this project on Fashion-MNIST (14x14 patches +
  middle class token like ImageNet Vim), the Fashion-MNIST test split;
- audio: an Audio Mamba trained by this project on the Free Spoken Digit Dataset, its 300 test clips;
- video: a VideoMamba trained by this project on moving Fashion-MNIST clips (class x direction), clips
  generated from the Fashion-MNIST test split."""
import argparse
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from mambamerge.cli import sweep
from mambamerge.cli.options import add_device_options

HELP = "sweep every method on a shipped demo model and data (image: the README's main job; audio; video)"
EXAMPLES = ("", "audio --out outputs/demo-audio", "video --limit 500 --threads 2")


class Demo(NamedTuple):
    checkpoint: str
    data: str
    limit: int
    what: str


DEMOS = {
    "image": Demo("vim_nano_fmnist.safetensors", "fashion-mnist", 2000, "test images (default: 2000 of the 10,000)"),
    "audio": Demo("aum_nano_fsdd.safetensors", "fsdd", 300, "test clips (default: all 300)"),
    "video": Demo("videomamba_nano_mfmnist.safetensors", "moving-fashion-mnist", 2000,
                  "test clips (default: 2000 of the 10,000)"),
}


def demo_checkpoint(task: str = "image") -> Path:
    path = Path(str(resources.files("mambamerge") / "assets" / DEMOS[task].checkpoint))
    if not path.is_file():
        raise FileNotFoundError(f"the demo checkpoint {path} is missing from the installation; reinstall the "
                                f"package or pass a checkpoint to `mambamerge sweep --checkpoint`")
    return path


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", nargs="?", default="image", choices=sorted(DEMOS),
                   help="which demo: image (default; Vim on Fashion-MNIST), audio (Audio Mamba on spoken digits) "
                        "or video (VideoMamba on moving Fashion-MNIST)")
    p.add_argument("--out", metavar="DIR", help="results folder (default: outputs/demo, outputs/demo-audio, "
                                                "outputs/demo-video)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="; ".join(f"{task}: {demo.what}" for task, demo in DEMOS.items()))
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores free at start)")
    add_device_options(p)


def run(args: argparse.Namespace) -> int:
    demo = DEMOS[args.task]
    out = args.out or ("outputs/demo" if args.task == "image" else f"outputs/demo-{args.task}")
    argv = ["--checkpoint", str(demo_checkpoint(args.task)), "--data", demo.data,
            "--limit", str(demo.limit if args.limit is None else args.limit), "--out", out]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    argv += ["--device", args.device, "--amp", args.amp]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    parser = argparse.ArgumentParser(prog="mambamerge sweep")
    sweep.add_parser(parser)
    return sweep.run(parser.parse_args(argv))
