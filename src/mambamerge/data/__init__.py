"""Datasets for training and evaluation: Fashion-MNIST / MNIST (IDX files) and user image folders;
moving Fashion-MNIST / MNIST clips and video folders; FSDD spoken digits and sound-file folders."""
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from mambamerge.data.audio_sets import DEMO_FRAMES, AudioClips, AudioInfo, audio_folder, fsdd
from mambamerge.data.datasets import IDX_SETS, IdxDataset, ImageSet, locate_idx, stratified, subset_record
from mambamerge.data.folders import ReadableImages, image_folder
from mambamerge.data.idx import read_idx
from mambamerge.data.video_sets import MOVING_SETS, MovingItems, VideoFolder, VideoInfo
from mambamerge.data.workers import loader_batches
from mambamerge.dataspec import DataSpec

# named data sets with a validation split held out of their training data (train / val / test)
VAL_SPLIT_SETS = ("fsdd", *MOVING_SETS)
# what a folder of inputs holds, as models name it (input_kind), and the rank of one input's shape
FOLDER_KINDS = {"images": 3, "clips": 4, "spectrograms": 2}


def load_dataset(spec: Union[str, DataSpec], split: str = "test", img_size: Optional[int] = None, in_chans: int = 3,
                 limit: Optional[int] = None, augment: bool = False, input_shape: Optional[Sequence[int]] = None,
                 input_kind: str = "images", start: int = 0):
    """A dataset by name, optionally "name:/folder/with/its/files": "fashion-mnist", "mnist" (images),
    "moving-fashion-mnist", "moving-mnist" (clips), "fsdd" (spoken digits); or a folder with one
    sub-folder per class (`spec` as text or a parsed dataspec.DataSpec). The result has `.info`
    (classes and the shape of one input).

    input_kind, input_shape: what the model takes (model.input_kind, model.input_shape); they say what a
    folder holds: "images" (C, H, W; img_size and in_chans are then taken from the shape), "clips"
    (C, T, H, W video files or frame folders), "spectrograms" (T, F from sound files); for fsdd, T is the
    number of feature frames (default 128).
    start: the inputs from this one on (file order) only. limit: this many of them only, chosen by
    data.datasets.stratified (round-robin over the classes in file order: every class is reached, and
    the subset is the same for every method and run; subset_record says so in a result file)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 input, got {limit}")
    if input_kind not in FOLDER_KINDS:
        raise ValueError(f"unknown input kind {input_kind!r}; known: {', '.join(FOLDER_KINDS)}")
    if input_shape is not None and len(input_shape) != FOLDER_KINDS[input_kind]:
        raise ValueError(f"input_shape {tuple(input_shape)} is not the shape of one of the {input_kind}; pass the "
                         f"model's input_kind with its input_shape")
    data = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec)
    name, root, spec = data.name, data.root or None, data.text
    shape = tuple(input_shape) if input_shape is not None else None
    if name in IDX_SETS:
        size = img_size or (shape[-1] if shape and input_kind == "images" else 56)
        return IdxDataset(name, split, root=root, img_size=size, limit=limit, augment=augment, start=start)
    if start < 0:
        raise ValueError(f"start must be 0 or more, got {start}")
    if name in MOVING_SETS:
        return MovingItems(MOVING_SETS[name], split, root=root, limit=limit, augment=augment, start=start)
    if name == "fsdd":
        frames = shape[0] if shape and input_kind == "spectrograms" else DEMO_FRAMES
        return fsdd(split, root, frames=frames, limit=limit, augment=augment, start=start)
    if not Path(spec).exists() and (":" in spec or "/" not in spec):
        raise ValueError(f"{spec!r} is neither a known data set nor an existing folder; known data sets: "
                         f"{', '.join((*IDX_SETS, *VAL_SPLIT_SETS))} (optionally NAME:/folder/with/its/files), or give "
                         f"the path of a folder with one sub-folder per class")
    if input_kind != "images" and shape is None:
        raise ValueError(f"a folder of {input_kind} needs input_shape (the model's input_shape) to be read")
    if input_kind == "clips":
        ds = VideoFolder(spec, frames=shape[1], size=shape[-1], in_chans=shape[0])
    elif input_kind == "spectrograms":
        return audio_folder(spec, frames=shape[0], limit=limit, augment=augment, start=start)
    else:
        if shape is not None:
            in_chans, img_size = shape[0], shape[-1]
        ds = image_folder(spec, img_size=img_size or 224, in_chans=in_chans)
    if start or (limit is not None and limit < len(ds)):
        info = ds.info
        ds = torch.utils.data.Subset(ds, stratified(ds.targets, limit, start))
        ds.info, ds.unreadable = info, getattr(ds.dataset, "unreadable", None)
    return ds


def unreadable(dataset) -> List[str]:
    """The images of an image folder skipped so far because they could not be decoded ("path (reason)")."""
    return sorted(getattr(dataset, "unreadable", None) or ())


def batches(dataset, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None,
            workers: int = 0, pin_memory: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches; in-memory sets (with a vectorised `batch(index, generator)`: IDX images,
    moving items, audio features) are sliced directly, others go through a DataLoader (`workers` decoding
    processes, pinned memory for fast copies to a GPU), which leaves out the images that cannot be
    decoded (a warning names each once; see unreadable()) and raises a bad input's error as it would
    without workers (data.workers)."""
    if hasattr(dataset, "batch"):
        order = torch.randperm(len(dataset), generator=generator) if shuffle else torch.arange(len(dataset))
        for start in range(0, len(dataset), batch_size):
            yield dataset.batch(order[start:start + batch_size], generator)
        return
    yield from loader_batches(dataset, getattr(dataset, "unreadable", None), batch_size=batch_size, shuffle=shuffle,
                              generator=generator, num_workers=workers, pin_memory=pin_memory)


__all__ = ["IDX_SETS", "MOVING_SETS", "VAL_SPLIT_SETS", "AudioClips", "AudioInfo", "IdxDataset", "ImageSet",
           "MovingItems", "ReadableImages", "VideoFolder", "VideoInfo", "audio_folder", "batches", "fsdd",
           "image_folder", "load_dataset", "locate_idx", "read_idx", "stratified", "subset_record", "unreadable"]
