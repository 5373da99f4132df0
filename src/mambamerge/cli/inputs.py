"""What the command line reads as input: the checkpoint and data set loaded from the shared options and
checked against each other. Torch is imported inside the loading functions only, so that `--help` stays
instant."""
import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from mambamerge.cli.options import setup_device
from mambamerge.dataspec import NAMED_SETS, DataSpec

if TYPE_CHECKING:
    import torch

    from mambamerge.merge.recipe import MergeRecipe


def load_inputs(args: argparse.Namespace) -> Tuple["torch.nn.Module", object, str]:
    """(model on --device, dataset, data label) from --checkpoint, --data, --split (default test), --limit,
    --img-size, with torch set to --threads; see open_data."""
    import torch

    from mambamerge.threads import default_threads

    torch.set_num_threads(default_threads(args.threads))
    device = setup_device(args)
    model, dataset, label = open_data(args, default_split="test", limit=args.limit)
    return model.to(device), dataset, label


def open_data(args: argparse.Namespace, default_split: str, limit: Optional[int],
              start: int = 0, check: Optional[Callable[["torch.nn.Module"], None]] = None,
              suggest_test: bool = True) -> Tuple["torch.nn.Module", object, str]:
    """(model on the CPU, dataset of `limit` of its inputs from `start` on (load_dataset), data label)
    from --checkpoint, --data, --split and --img-size, for any family: images, clips or spectrograms, as
    the model's input_kind says. Every way they do not fit each other is a ValueError naming both sides.
    check: called with the model before any data is read (to refuse settings the model cannot run before
    any work). suggest_test: a missing split's error points to the shipped test split."""
    from mambamerge.checkpoint import load_checkpoint
    from mambamerge.data import load_dataset
    from mambamerge.devices import parse_device
    from mambamerge.evaluate import check_classes, check_fit
    from mambamerge.memory import check_side, check_size_args

    data = DataSpec.parse(args.data)
    named = data.named
    if args.split and not named:
        raise ValueError(f"--split applies to the named data sets ({', '.join(NAMED_SETS)}); a "
                         f"folder is one split: pass the split's own folder (e.g. imagenet/val) as --data")
    check_side("--img-size", args.img_size)
    model = load_checkpoint(args.checkpoint, img_size=args.img_size)
    check_size_args(args, model, parse_device(getattr(args, "device", None) or "cpu"))
    shape, name, images = tuple(model.input_shape), Path(args.checkpoint).name, model.input_kind == "images"
    if images and shape[1] != shape[2]:
        raise ValueError(f"{name} runs at {shape[1]}x{shape[2]} images but datasets are loaded square; pass "
                         f"--img-size N to evaluate at NxN")
    if images and not named and shape[0] not in (1, 3):
        raise ValueError(f"{name} takes {shape[0]}-channel images but image folders give 1 (grey) or 3 (RGB)")
    if check is not None:
        check(model)
    split = args.split or default_split
    try:
        dataset = load_dataset(data, split, input_shape=shape, input_kind=model.input_kind, limit=limit,
                               start=start)
    except FileNotFoundError as err:
        if not named or split == "test" or data.root is not None or not suggest_test:
            raise
        raise FileNotFoundError(f"{err}; or use the test split, which ships with mambamerge: --split test") from None
    label = f"{args.data} {split}" if named else args.data
    if len(dataset) == 0:
        raise ValueError(f"{label} holds no inputs" + (f" from input {start} on" if start else ""))
    check_fit(model, dataset.info, label)
    check_classes(model, dataset.info, label)
    return model, dataset, label


def describe(model, checkpoint: str) -> str:
    from mambamerge.evaluate import describe_input

    cfg, one = model.cfg, describe_input(model.input_kind, model.input_shape)
    return (f"{Path(checkpoint).name}: {model.family} model, {cfg.depth} blocks, width {cfg.embed_dim}, "
            f"{model.layout.length} tokens ({one}), {cfg.num_classes} classes")


def recorded_merge(model, checkpoint: str, command: str, doing: str,
                   schedule: bool = True) -> Optional["MergeRecipe"]:
    """The token reduction `checkpoint` records (it was fine-tuned with it), announced on stderr with
    `doing` (what the command does with it, and how to do otherwise); None when it records none.
    schedule: its per-block schedule will run, so it is first checked to fit `model`."""
    from mambamerge.distributed import world

    recipe = getattr(model, "merge_recipe", None)
    if recipe is None:
        return None
    if schedule:
        recipe.check_fits(model)
    if world().is_main:
        print(f"mambamerge {command}: {Path(checkpoint).name} was fine-tuned with {recipe.describe()}; {doing}",
              file=sys.stderr)
    return recipe
