"""User datasets in the ImageNet layout: <root>/<class name>/<image files>, transformed by torchvision
(evaluation) or timm (training augmentation).

An image that cannot be decoded (corrupt, truncated, a decompression bomb, more pixels or a more
extreme side ratio than data.bounds allows) is skipped with a warning, never a traceback: its batch comes out without it, and the dataset's `unreadable` set
names it (what evaluate() and the commands report).
"""
import math
import warnings
from pathlib import Path
from typing import List, Optional, Set, Tuple

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, default_collate

from mambamerge.data.bounds import open_picture, walk_files
from mambamerge.data.datasets import ImageSet, class_folders
from mambamerge.train_settings import Augment

SPLIT_NAMES = {"train", "val", "test"}
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def posterize(image: Image.Image, bits: int, **_) -> Image.Image:
    """timm's posterize op with the bits kept clamped to Pillow's 1..8: timm's increasing policy asks
    for 0 at the top magnitude (and RandAugment's magnitude noise reaches it), which Pillow refuses."""
    from PIL import ImageOps

    bits = min(max(int(bits), 1), 8)
    return image if bits == 8 else ImageOps.posterize(image, bits)


def clamp_posterize(transform) -> None:
    """Every timm augmentation op inside `transform` (Compose, RandAugment, AutoAugment, AugMix) that
    posterizes uses `posterize` above instead of timm's."""
    from timm.data import auto_augment

    stack = [transform]
    while stack:
        item = stack.pop()
        if isinstance(item, auto_augment.AugmentOp):
            if item.aug_fn is auto_augment.posterize:
                item.aug_fn = posterize
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            stack.extend(getattr(item, name) for name in ("transforms", "ops", "policy") if hasattr(item, name))


def probe_folder(root, per_class: int = 3) -> Tuple[int, Optional[int]]:
    """(channels, size) the images of a folder suggest, from the headers of the first `per_class`
    files of every class: 1 when all are grey, else 3; their side when all are one square size, else
    None."""
    grey, sizes = True, set()
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for path in sorted(p for p in folder.iterdir() if p.is_file())[:per_class]:
            try:
                with Image.open(path) as image:
                    grey &= image.mode in GREY_MODES
                    sizes.add(image.size)
            except OSError:
                continue
    side = next(iter(sizes))[0] if len(sizes) == 1 and len(set(next(iter(sizes)))) == 1 else None
    return (1 if grey and sizes else 3), side


def normalisation(channels: int):
    """(mean, std) per channel of images in [0, 1]: ImageNet's for 3 channels, 0.5 / 0.5 otherwise."""
    return (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)


def eval_transform(img_size: int = 224, in_chans: int = 3, crop_pct: float = 0.875, interpolation: str = "bicubic",
                   mean=None, std=None):
    """The official Vim evaluation transform (DeiT's): resize the short side to floor(img_size / crop_pct)
    with `interpolation`, centre crop img_size, to a tensor, normalise (`normalisation(in_chans)` unless
    mean and std are given); grey images for in_chans=1. A model's `pretrained_cfg`
    holds these settings."""
    from torchvision import transforms

    mode = transforms.InterpolationMode(interpolation)
    resize = transforms.Resize(math.floor(img_size / crop_pct), interpolation=mode)
    steps = [resize, transforms.CenterCrop(img_size)]
    if in_chans == 1:
        steps.append(transforms.Grayscale(1))
    if mean is None or std is None:
        mean, std = normalisation(in_chans)
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def image_folder(root, img_size: int = 224, in_chans: int = 3, augment: Optional[Augment] = None):
    """The images of `<root>/<class name>/...` (any depth below a class folder, links to folders not
    followed, regular files only; see data.bounds) with Vim's evaluation transform (`eval_transform`), or
    with `augment` the training transform of timm's factory (random resized crop, flip, RandAugment,
    colour jitter, random erasing). The dataset gets an `info` ImageSet. Missing folders, folders without
    class sub-folders or classes without images are clear errors."""
    from torchvision import transforms
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root, classes = class_folders(root, "<images> (ImageNet layout)")
    if set(classes) <= SPLIT_NAMES:
        raise ValueError(f"{root} holds the split folders {', '.join(classes)}, not class folders: give one split's "
                         f"folder, e.g. {root / classes[-1]}")
    if augment is None:
        transform = eval_transform(img_size, in_chans)
    else:
        steps = [transforms.Grayscale(1)] if in_chans == 1 else []
        transform = transforms.Compose(steps + [augment.transform(img_size, *normalisation(in_chans))])
    links: List[Path] = []
    samples = [(path, label) for label, name in enumerate(classes) for path in walk_files(root / name, links)
               if path.suffix.lower() in IMG_EXTENSIONS]
    if not samples:
        raise ValueError(f"{root}: no images found in its class folders; supported extensions: "
                         f"{', '.join(IMG_EXTENSIONS)}")
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        raise ValueError(f"{root}: the class folders {', '.join(empty)} hold no images; supported extensions: "
                         f"{', '.join(IMG_EXTENSIONS)}")
    if links:
        warnings.warn(f"{root}: {len(links)} links to folders not followed (e.g. {links[0]}); link the class folder "
                      f"itself or the image files instead", stacklevel=2)
    return ReadableImages(samples, transform, ImageSet(list(classes), in_chans, (img_size, img_size)))


def load_rgb(path) -> Image.Image:
    """An image file decoded as RGB, after its size was checked (data.bounds.open_picture)."""
    with open_picture(path) as image:
        return image.convert("RGB")


class ReadableImages(Dataset):
    """(image, label) of the `samples` (path, class index), `transform`ed; an image that cannot be
    decoded comes out as (None, "path (reason)") instead of raising (batch with collate_readable), and
    `unreadable` collects the ones met so far. A transform's failure is raised, never counted as an
    unreadable image."""

    def __init__(self, samples: List[Tuple[Path, int]], transform, info: ImageSet):
        self.samples, self.transform, self.info = samples, transform, info
        self.targets = [label for _, label in samples]
        self.unreadable: Set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except (OSError, ValueError, SyntaxError) as err:
            return None, f"{path} ({err})"
        return self.transform(image), label


def collate_readable(items) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], list]:
    """(images, labels, the "path (reason)" of each unreadable image): images and labels None when
    no image of the batch could be read."""
    good = [item for item in items if item[0] is not None]
    bad = [reason for image, reason in items if image is None]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, bad
