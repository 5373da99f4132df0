"""`mambamerge info`: list the models, or describe what a checkpoint file holds."""
import argparse

from mambamerge.checkpoint import check_tensors, family_config, infer_config, read_checkpoint
from mambamerge.loaders import FAMILY_NAMES, detect_family
from mambamerge.models import OFFICIAL_NAMES, list_models

HELP = ("list the known models, or show the architecture, class names and fine-tuned token reduction of a "
        "checkpoint file")
_CLASSES_SHOWN = 20


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint to describe (.pth or .safetensors)")
    p.add_argument("--img-size", type=int, default=None,
                   help="resolution to infer the geometry for (default: the one the file records, else 224)")
    p.add_argument("--models", action="store_true", help="list the model names create_model accepts")


def run(args: argparse.Namespace) -> int:
    if args.models or not args.checkpoint:
        for name in list_models():
            alias = f"  (= {OFFICIAL_NAMES[name]})" if name in OFFICIAL_NAMES else ""
            print(name + alias)
        return 0
    raw = read_checkpoint(args.checkpoint)
    family = raw.family or detect_family(raw.state_dict)
    n = sum(t.numel() for t in raw.state_dict.values())
    print(f"{args.checkpoint}: {FAMILY_NAMES.get(family, family)}, {len(raw.state_dict)} tensors, "
          f"{n / 1e6:.2f} M values")
    if family != "vim":
        cfg, _ = family_config(raw, args.checkpoint, family)
    else:
        cfg, grid = infer_config(raw, img_size=args.img_size)
        check_tensors(raw, cfg, grid, args.checkpoint)
        print(f"trained grid {grid[0]}x{grid[1]}; at {cfg.img_size[0]}x{cfg.img_size[1]}: grid "
              f"{cfg.grid_size[0]}x{cfg.grid_size[1]}")
    for key, value in cfg.to_dict().items():
        print(f"  {key:15s} {value}")
    if cfg.num_classes == 0:
        print("no classification head: a feature extractor (its forward gives the pooled feature)")
    if raw.classes is not None:
        shown = ", ".join(raw.classes[:_CLASSES_SHOWN])
        more = f" ... and {len(raw.classes) - _CLASSES_SHOWN} more" if len(raw.classes) > _CLASSES_SHOWN else ""
        print(f"classes ({len(raw.classes)}): {shown}{more}")
    if raw.merge is not None:
        print(f"token reduction it was saved running (fine-tuned with): {raw.merge.describe()} (eval, sweep and speed "
              f"default to it; mambamerge.patch(model, model.merge_recipe) in Python)")
    return 0
