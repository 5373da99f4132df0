"""User datasets in the ImageNet layout: <root>/<class name>/<image files>, through torchvision.

An image that cannot be decoded (corrupt, truncated, a decompression bomb) is skipped with a
warning, never a traceback: its batch comes out without it, and the dataset's `unreadable` set
names it (what evaluate() and the commands report).
"""
from pathlib import Path
from typing import Optional, Set, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from mambamerge.data.datasets import ImageSet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_NAMES = {"train", "val", "test"}


def image_folder(root, img_size: int = 224, in_chans: int = 3):
    """torchvision ImageFolder with Vim's evaluation transform (resize the short side to
    img_size / 0.875, centre crop, ImageNet normalisation). The dataset gets an `info` ImageSet.
    Missing folders, folders without class sub-folders or without images are clear errors."""
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders: expected <root>/<class name>/<images> (ImageNet layout)")
    if set(classes) <= SPLIT_NAMES:
        raise ValueError(f"{root} holds the split folders {', '.join(classes)}, not class folders: give one split's "
                         f"folder, e.g. {root / classes[-1]}")
    steps = [transforms.Resize(int(round(img_size / 0.875))), transforms.CenterCrop(img_size)]
    if in_chans == 1:
        steps.append(transforms.Grayscale(1))
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    try:
        ds = datasets.ImageFolder(str(root), transform=transforms.Compose(steps))
    except FileNotFoundError as err:
        raise ValueError(f"{root}: no images found ({err}); supported extensions: "
                         f"{', '.join(datasets.folder.IMG_EXTENSIONS)}") from None
    return ReadableImages(ds, ImageSet(list(ds.classes), in_chans, (img_size, img_size)))


class ReadableImages(Dataset):
    """An ImageFolder whose undecodable images come out as (None, "path (reason)") instead of raising;
    batch them with collate_readable. `unreadable` collects the ones met so far."""

    def __init__(self, folder, info: ImageSet):
        self.folder, self.info = folder, info
        self.unreadable: Set[str] = set()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        try:
            return self.folder[index]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return None, f"{self.folder.samples[index][0]} ({err})"


def collate_readable(items) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], list]:
    """(images, labels, the "path (reason)" of each unreadable image): images and labels None when
    no image of the batch could be read."""
    good = [item for item in items if item[0] is not None]
    bad = [reason for image, reason in items if image is None]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, bad
