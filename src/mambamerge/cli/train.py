"""`mambamerge train`: train a model (from scratch, or fine-tune a checkpoint, optionally with token
reduction active) on a dataset, seeded and resumable."""
import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from mambamerge.atomic import write_bytes
from mambamerge.checkpoint import load_checkpoint
from mambamerge.cli.eval import check_method, check_reduction
from mambamerge.data import load_dataset
from mambamerge.models import create_model, list_models
from mambamerge.patch import patch
from mambamerge.results import check_writable
from mambamerge.threads import default_threads
from mambamerge.train import TrainConfig, load_resume, train

HELP = "train or fine-tune a model on a dataset (seeded; --resume continues an interrupted run)"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, mnist (optionally name:/folder/with/idx), or an ImageNet-layout folder "
                        "(with train/ and val/ sub-folders)")
    p.add_argument("--model", default="vim_nano", choices=list_models(), metavar="NAME",
                   help="architecture for training from scratch (default vim_nano: the demo model)")
    p.add_argument("--init", help="checkpoint to fine-tune instead of training from scratch")
    p.add_argument("--out", required=True, help="output folder: model.safetensors, last.pt, history.json")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--method", help="train with this token-reduction method active (fine-tuning for merging)")
    p.add_argument("--reduction", type=float, default=None, help="target average reduction for --method")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores free at start)")
    p.add_argument("--device", default="cpu", help="where to train: cpu (default), cuda, cuda:1, ...")
    for f in fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"default {f.default}")


def _splits(spec: str, args, img_size, in_chans):
    folder = Path(spec)
    if folder.is_dir():
        for name in ("train", "val"):
            if not (folder / name).is_dir():
                raise FileNotFoundError(f"{folder} needs train/ and val/ sub-folders in the ImageNet layout")
        return (load_dataset(str(folder / "train"), img_size=img_size, in_chans=in_chans, limit=args.limit),
                load_dataset(str(folder / "val"), img_size=img_size, in_chans=in_chans))
    return (load_dataset(spec, "train", img_size=img_size, limit=args.limit, augment=True),
            load_dataset(spec, "test", img_size=img_size))


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name ({err}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no usable CUDA GPU; train with --device cpu")
    return device


def _check_args(args: argparse.Namespace) -> TrainConfig:
    """Every setting checked before any data is read or file written; returns the training config."""
    for name in ("limit", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if args.method is None and args.reduction is not None:
        raise ValueError("--reduction needs --method NAME")
    if args.method is not None:
        check_method(args.method, {})
        if args.reduction is None:
            raise ValueError(f"--method {args.method} needs --reduction R (e.g. 0.4): without it the model would "
                             f"train dense")
        check_reduction(args.reduction)
    check_writable(args.out, create=False)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def run(args: argparse.Namespace) -> int:
    cfg = _check_args(args)
    torch.set_num_threads(default_threads(args.threads))
    device = _device(args.device)
    out = Path(args.out)
    saved = load_resume(out / "last.pt", cfg) if args.resume else False
    base = load_checkpoint(args.init) if args.init else None
    arch = base.cfg if base is not None else create_model(args.model).cfg
    train_set, val_set = _splits(args.data, args, arch.img_size[0], arch.in_chans)
    info = train_set.info
    if base is None:
        model = create_model(args.model, in_chans=info.in_chans, num_classes=info.num_classes, img_size=info.img_size)
    elif info.num_classes != base.cfg.num_classes:
        raise ValueError(f"the checkpoint has {base.cfg.num_classes} classes but the data has {info.num_classes}; "
                         f"fine-tune on data with {base.cfg.num_classes} classes")
    else:
        model = base
    model.to(device)
    if args.method:
        patch(model, args.method, reduction=args.reduction)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "command.json", json.dumps({"data": args.data, "model": args.model, "init": args.init,
                                                  "method": args.method, "reduction": args.reduction,
                                                  "limit": args.limit, "train": cfg.__dict__}, indent=1))
    result = train(model, train_set, val_set, out, cfg, resume=saved)
    print(f"best val top-1 {result['best_accuracy']:.2%} after {result['epochs']} epochs; "
          f"weights in {out / 'model.safetensors'}")
    return 0
