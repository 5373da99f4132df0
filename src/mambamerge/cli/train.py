"""`mambamerge train`: train a model (from scratch, or fine-tune a checkpoint, optionally with token
reduction active and distilled from a teacher) on a dataset; seeded, resumable, and runnable under
torchrun unchanged."""
import argparse
import json
import math
import re
from dataclasses import fields
from pathlib import Path

from mambamerge.cli.names import MODELS
from mambamerge.cli.options import (add_device_options, check_at_least_one, check_method, check_reduction,
                                    default_workers, parse_options, setup_device)
from mambamerge.dataspec import DataSpec
from mambamerge.train_settings import Augment, TrainConfig

HELP = ("train or fine-tune a model on a dataset (seeded; --resume continues an interrupted run or extends a finished "
        "one with more --epochs)")
# defaults that depend on the data: image folders get Vim's ImageNet recipe, the IDX sets their own
# shift-and-flip augmentation only
FOLDER_RECIPE = {"mixup": 0.8, "cutmix": 1.0}
SKIPPED = ("amp",)  # TrainConfig fields with an option of their own (add_device_options)
MAX_AUGMENT_OPS = 16  # operations (or chains) per image a --aa policy may ask for (timm's default RandAugment: 2)
EXAMPLES = ("--data fashion-mnist --epochs 10 --out outputs/fmnist",
            "--data imagenet/ --init vim_t_midclstok_76p1acc.pth --method mame --reduction 0.4 --teacher dense "
            "--epochs 5 --out outputs/vim-t-mame",
            "--data fashion-mnist --epochs 12 --out outputs/fmnist --resume")
RUN_FILES = ("command.json", "last.pt", "model.safetensors", "model_last.safetensors", "history.json", "summary.json")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="fashion-mnist, mnist (optionally name:/folder/with/idx), fsdd, moving-fashion-mnist, "
                        "moving-mnist, or a folder with train/ and val/ sub-folders in the ImageNet layout (val/ is "
                        "the test split: reported, never used to select)")
    p.add_argument("--model", default="vim_nano", choices=MODELS, metavar="NAME",
                   help="architecture for training from scratch (default vim_nano: the demo model)")
    p.add_argument("--img-size", type=int, metavar="PIXELS",
                   help="training resolution (default: a folder's own square image size, else the model's; with "
                        "--init the checkpoint's)")
    p.add_argument("--in-chans", type=int, choices=(1, 3),
                   help="1 (grey) or 3 (RGB) for a new model (default: 1 when a folder's images are all grey)")
    p.add_argument("--init", help="checkpoint to fine-tune instead of training from scratch")
    p.add_argument("--teacher", metavar="dense|FILE",
                   help="distil from this model: 'dense' (the --init checkpoint without token reduction) or another "
                        "checkpoint (loss: cross-entropy + --distill-weight x KL at --distill-temperature)")
    p.add_argument("--out", required=True, help="output folder: model.safetensors (best on validation), "
                                                "model_last.safetensors, last.pt, history.json, summary.json")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/last.pt with the same settings; with more --epochs, extend the run "
                        "(from there on the learning rate follows the longer schedule)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the training run already in --out and start a new one (without it, or --resume, "
                        "an --out holding a run is refused)")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also save last.pt every STEPS steps (default: at epoch ends only)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only N training images (after the validation split is held out): round-robin over the "
                        "classes in file order, the same N for every run")
    p.add_argument("--val-split", type=float, default=0.1, metavar="F|N",
                   help="validation images held out of the training data to select the best epoch: a fraction "
                        "(default 0.1) or a count; the same slice for every --seed and --limit")
    p.add_argument("--method", help="train with this token-reduction method active (fine-tuning for merging)")
    p.add_argument("--reduction", type=float, default=None, help="target average reduction for --method")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of --method, as for mambamerge.patch, e.g. --option match=window; repeatable (the "
                        "checkpoints record the method, its options and the schedule: eval runs them)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores free at start)")
    add_device_options(p)
    p.add_argument("--aa", default=None, metavar="POLICY",
                   help=f"image folders: timm RandAugment policy, or none (default {Augment.auto_augment})")
    p.add_argument("--reprob", type=float, default=None,
                   help=f"image folders: random-erasing probability (default {Augment.re_prob})")
    for f in fields(TrainConfig):
        if f.name in SKIPPED:
            continue
        default = None if f.name in FOLDER_RECIPE else f.default
        note = (f"default {FOLDER_RECIPE[f.name]} for image folders, 0 for the named sets" if f.name in FOLDER_RECIPE
                else f"default {f.default}")
        flags = ["--" + f.name.replace("_", "-")] + (["--batch"] if f.name == "batch_size" else [])  # eval's name
        p.add_argument(*flags, type=type(f.default), default=default, help=note)


def _check_args(args: argparse.Namespace) -> TrainConfig:
    """Every setting checked before any data is read or file written; returns the training config."""
    from mambamerge.results import check_writable

    check_at_least_one(args, "limit", "img_size", "threads")
    if not (math.isfinite(args.val_split) and args.val_split > 0):
        raise ValueError(f"--val-split must be a fraction in (0, 1) or a number of images, got {args.val_split}")
    if args.reprob is not None and not 0.0 <= args.reprob <= 1.0:
        raise ValueError(f"--reprob is a probability in [0, 1], got {args.reprob}")
    if args.aa not in (None, "none"):
        _check_policy(args.aa)
    if args.save_every < 0:
        raise ValueError(f"--save-every must be 0 (epoch ends only) or more, got {args.save_every}")
    if args.teacher == "dense" and not args.init:
        raise ValueError("--teacher dense distils from the --init checkpoint: give --init, or a teacher checkpoint")
    if args.init and args.in_chans is not None:
        raise ValueError("--in-chans applies to a new model; a fine-tuned checkpoint keeps its own channels")
    options = parse_options(args.option)
    if args.method is None and (args.reduction is not None or options):
        raise ValueError("--reduction and --option need --method NAME")
    if args.method is not None:
        check_method(args.method, options)
        if args.reduction is None:
            raise ValueError(f"--method {args.method} needs --reduction R (e.g. 0.4): without it the model would "
                             f"train dense")
        check_reduction(args.reduction)
    check_writable(args.out, create=False)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    found = _run_files(Path(args.out))
    if found and not (args.resume or args.overwrite):
        raise ValueError(f"{args.out} already holds a training run ({', '.join(found)}): --resume continues it (or "
                         f"extends it with more --epochs), --overwrite deletes it and starts again; or give another "
                         f"--out")
    named = DataSpec.parse(args.data).named  # mixup / cutmix: image folders only
    recipe = {k: getattr(args, k) if getattr(args, k) is not None else 0.0 if named else v
              for k, v in FOLDER_RECIPE.items()}
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in recipe
                          and f.name not in SKIPPED}, **recipe, amp=args.amp)


def _check_policy(policy: str) -> None:
    """--aa: a policy timm builds (rand-..., augmix-..., original, v0, 3a, ...) applying at most
    MAX_AUGMENT_OPS operations to an image (`rand-n999999999` would never finish one)."""
    try:
        Augment(auto_augment=policy).transform(32, (0.5,), (0.5,))
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise ValueError(f"--aa {policy!r} is not a timm augmentation policy ({err}); give one such as "
                         f"{Augment.auto_augment}, augmix-m5-w4-d2, original or 3a, or none") from None
    for section in policy.split("-")[1:]:
        key, count = re.fullmatch(r"([a-z]*)(.*)", section).groups()
        if key in ("n", "w", "d") and count.isdigit() and int(count) > MAX_AUGMENT_OPS:
            raise ValueError(f"--aa {policy!r}: {key}{count} asks for {count} augmentations per image; at most "
                             f"{MAX_AUGMENT_OPS}")


def _run_files(out: Path) -> list:
    """The files of a training run already in `out`."""
    return [name for name in RUN_FILES if (out / name).exists()]


def _idx_splits(args, img_size: int):
    """(train, validation, test) of an IDX set: validation held out of the train split."""
    from mambamerge.data import load_dataset
    from mambamerge.data.loading import holdout_split, limited

    full = load_dataset(args.data, "train", img_size=img_size)
    train_index, val_index = holdout_split(len(full), args.val_split)
    return (full.subset(limited(train_index, full.labels.tolist(), args.limit), augment=True),
            full.subset(val_index, augment=False),
            load_dataset(args.data, "test", img_size=img_size))


def _folder_splits(args, img_size: int, in_chans: int):
    """(train, validation, test) of an image folder: validation held out of train/, test = val/."""
    from mambamerge.data.folders import image_folder
    from mambamerge.data.loading import holdout_split, limited, subset

    root = Path(args.data)
    augment = Augment(**{k: v for k, v in (("auto_augment", None if args.aa == "none" else args.aa),
                                           ("re_prob", args.reprob)) if v is not None})
    train_all = image_folder(root / "train", img_size=img_size, in_chans=in_chans, augment=augment)
    plain = image_folder(root / "train", img_size=img_size, in_chans=in_chans)
    train_index, val_index = holdout_split(len(plain), args.val_split)
    return (subset(train_all, limited(train_index, plain.targets, args.limit)), subset(plain, val_index),
            image_folder(root / "val", img_size=img_size, in_chans=in_chans))


def _named_splits(args, model):
    """(train, validation, test) of a named set that holds out its own validation split from its
    training data (fsdd, moving-*), for the inputs `model` takes."""
    from mambamerge.data import load_dataset

    return tuple(load_dataset(args.data, split, input_shape=model.input_shape, input_kind=model.input_kind,
                              augment=split == "train",
                              limit=args.limit if split == "train" else None) for split in ("train", "val", "test"))


def _family_data(args, base):
    """(train, validation, test, model) of the audio and video sets: the model is built as named."""
    from mambamerge.evaluate import check_classes, check_fit
    from mambamerge.models import create_model

    if args.aa is not None or args.reprob is not None or args.img_size or args.in_chans:
        raise ValueError(f"--aa, --reprob, --img-size and --in-chans apply to image data; {args.data} gives inputs "
                         f"of the shape its model is built for")
    model = base if base is not None else create_model(args.model)
    train_set, val_set, test_set = _named_splits(args, model)
    info = train_set.info
    if base is None:
        model = create_model(args.model, num_classes=info.num_classes)
        if tuple(model.input_shape) != tuple(info.input_shape):
            raise ValueError(f"{args.model} takes inputs of shape {tuple(model.input_shape)} but {args.data} gives "
                             f"{tuple(info.input_shape)}; pick a model built for this data")
    else:
        check_fit(base, info, args.data)
        check_classes(base, info, args.data)
    return train_set, val_set, test_set, model


def _data(args, base):
    """(train, validation, test, model) with the model built for the data (or checked against it)."""
    from mambamerge.data.folders import probe_folder
    from mambamerge.evaluate import check_classes, check_fit, describe_input
    from mambamerge.models.adapter import family_title
    from mambamerge.models import create_model

    data = DataSpec.parse(args.data)
    if data.has_val_split:
        return _family_data(args, base)
    is_idx = data.is_idx
    if not is_idx:
        folder = Path(args.data)
        for name in ("train", "val"):
            if not (folder / name).is_dir():
                raise FileNotFoundError(f"{folder} needs train/ and val/ sub-folders in the ImageNet layout")
    elif args.aa is not None or args.reprob is not None:
        raise ValueError("--aa and --reprob apply to image folders; the IDX sets use their own shift-and-flip")
    elif args.in_chans == 3:
        raise ValueError(f"{args.data} is grey: its models take --in-chans 1")
    if base is not None and base.input_kind != "images":
        raise ValueError(f"--init {args.init} ({family_title(base.family)}) takes "
                         f"{describe_input(base.input_kind, base.input_shape)}, but {args.data} gives images; "
                         f"fine-tune it on data of its kind (e.g. fsdd for audio, moving-fashion-mnist for video)")
    if base is not None:
        img_size, in_chans = base.cfg.img_size[0], base.cfg.in_chans
    elif is_idx:
        img_size, in_chans = args.img_size or create_model(args.model).cfg.img_size[0], 1
    else:
        channels, side = probe_folder(Path(args.data) / "train")
        img_size = args.img_size or side or create_model(args.model).cfg.img_size[0]
        in_chans = args.in_chans or channels
    train_set, val_set, test_set = _idx_splits(args, img_size) if is_idx else _folder_splits(args, img_size, in_chans)
    info = train_set.info
    if base is None:
        model = create_model(args.model, in_chans=info.in_chans, num_classes=info.num_classes, img_size=info.img_size)
    else:
        check_fit(base, info, args.data)
        check_classes(base, info, args.data)
        model = base
    return train_set, val_set, test_set, model


def _input_record(model) -> dict:
    """What a run record says of the model's input: image size and channels, or the input shape."""
    if model.input_kind == "images":
        return {"img_size": model.cfg.img_size[0], "in_chans": model.cfg.in_chans}
    return {"input_shape": list(model.input_shape)}


def run(args: argparse.Namespace) -> int:
    cfg = _check_args(args)
    import torch

    from mambamerge import distributed
    from mambamerge.atomic import write_bytes
    from mambamerge.checkpoint import load_checkpoint
    from mambamerge.data.datasets import SUBSET_RULE
    from mambamerge.distributed import world
    from mambamerge.evaluate import check_classes, check_fit
    from mambamerge.patch import patch
    from mambamerge.threads import default_threads
    from mambamerge.train import load_resume, run_record, train

    from mambamerge.memory import check_side, check_size_args

    torch.set_num_threads(default_threads(args.threads))
    device = setup_device(args)
    check_side("--img-size", args.img_size)
    data = DataSpec.parse(args.data)
    torch.manual_seed(cfg.seed)  # before any model is built: the same seed gives the same initial weights
    base = load_checkpoint(args.init, img_size=args.img_size) if args.init else None
    train_set, val_set, test_set, model = _data(args, base)
    teacher = None
    if args.teacher:
        size = {"img_size": model.cfg.img_size} if hasattr(model.cfg, "img_size") else {}
        teacher = load_checkpoint(args.init if args.teacher == "dense" else args.teacher, **size)
        check_fit(teacher, train_set.info, args.data)
        check_classes(teacher, train_set.info, args.data)
        teacher.to(device)
    check_size_args(args, model, device, training=True)
    model.to(device)
    options = parse_options(args.option)
    if args.method:
        patch(model, args.method, reduction=args.reduction, **options)
    out = Path(args.out)
    command = {"data": args.data, "model": None if args.init else args.model, "init": args.init,
               "teacher": args.teacher, "method": args.method, "reduction": args.reduction,
               **({"options": options} if options else {}),  # absent without: older last.pt files still resume
               "limit": args.limit, **({"subset": SUBSET_RULE} if args.limit else {}),
               "val_split": args.val_split, **_input_record(model),
               "augment": None if data.is_idx else [args.aa, args.reprob]}
    saved = load_resume(out / "last.pt", cfg, run_record(command, train_set, val_set, teacher is not None)) \
        if args.resume else False
    if world().is_main:
        if args.overwrite:
            for name in _run_files(out):
                (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            write_bytes(out / "command.json", json.dumps({**command, "train": cfg.__dict__}, indent=1))
    test_name = "test" if data.named else f"{Path(args.data) / 'val'}"
    result = train(model, train_set, val_set, out, cfg, resume=saved, teacher=teacher, test_set=test_set,
                   run=command, workers=default_workers(args.workers), save_every=args.save_every,
                   log=print if world().is_main else lambda *_: None, test_name=test_name)
    distributed.teardown()
    if world().is_main:
        print(f"best val top-1 {result['best_accuracy']:.2%} (epoch {result['best_epoch']} of {result['epochs']}, "
              f"{len(val_set)} held-out training images); {test_name} top-1 {result['test_accuracy']:.2%} "
              f"({len(test_set)} images, reported only); weights in {out / 'model.safetensors'}")
    return 0
