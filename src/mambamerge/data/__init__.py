"""Datasets for training and evaluation: Fashion-MNIST / MNIST (IDX files) and user image folders."""
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from mambamerge.data.datasets import IDX_SETS, IdxDataset, ImageSet, locate_idx
from mambamerge.data.folders import ReadableImages, collate_readable, image_folder
from mambamerge.data.idx import read_idx


def load_dataset(spec: str, split: str = "test", img_size: Optional[int] = None, in_chans: int = 3,
                 limit: Optional[int] = None, augment: bool = False, start: int = 0):
    """A dataset by name ("fashion-mnist", "mnist", optionally "name:/folder/with/idx/files") or an
    image folder path (ImageNet layout). The result has `.info` (classes, channels, size).
    start, limit: images start .. start + limit - 1 only (IDX sets; folders take the first `limit`)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 image, got {limit}")
    name, colon, root = spec.partition(":")
    if name in IDX_SETS:
        return IdxDataset(name, split, root=root or None, img_size=img_size or 56, limit=limit, augment=augment,
                          start=start)
    if start:
        raise ValueError(f"start= is for the IDX sets ({', '.join(IDX_SETS)}), not image folders like {spec}")
    if not Path(spec).exists() and (colon or "/" not in spec):
        raise ValueError(f"{spec!r} is neither a known data set nor an existing folder; known data sets: "
                         f"{', '.join(IDX_SETS)} (optionally NAME:/folder/with/idx/files), or give the path of an "
                         f"image folder")
    ds = image_folder(spec, img_size=img_size or 224, in_chans=in_chans)
    if limit is not None and limit < len(ds):
        ds = torch.utils.data.Subset(ds, range(limit))
        ds.info, ds.unreadable = ds.dataset.info, ds.dataset.unreadable
    return ds


def unreadable(dataset) -> List[str]:
    """The images of an image folder skipped so far because they could not be decoded ("path (reason)")."""
    return sorted(getattr(dataset, "unreadable", ()))


def batches(dataset, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None,
            workers: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches; IDX sets are sliced in memory, folders go through a DataLoader, which
    leaves out the images that cannot be decoded (a warning names each once; see unreadable())."""
    if isinstance(dataset, IdxDataset):
        order = torch.randperm(len(dataset), generator=generator) if shuffle else torch.arange(len(dataset))
        for start in range(0, len(dataset), batch_size):
            yield dataset.batch(order[start:start + batch_size], generator)
        return
    skipped = getattr(dataset, "unreadable", None)
    if skipped is None:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                              num_workers=workers)
        return
    for images, labels, bad in DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                          num_workers=workers, collate_fn=collate_readable):
        for reason in bad:
            if reason not in skipped:
                skipped.add(reason)
                warnings.warn(f"skipped an unreadable image: {reason}", stacklevel=2)
        if images is not None:
            yield images, labels


__all__ = ["IDX_SETS", "IdxDataset", "ImageSet", "ReadableImages", "batches", "image_folder", "load_dataset",
           "locate_idx", "read_idx", "unreadable"]
