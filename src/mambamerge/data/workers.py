"""DataLoader batches whose data errors read as they would without workers: the ValueError (or
FileNotFoundError) of a bad input raised in a worker process reaches the caller as that exception with
its own one-line message, not as torch's multi-line "Caught ValueError in DataLoader worker process"
report; images that cannot be decoded (collate_readable) are named in a warning once and left out."""
import warnings
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from mambamerge.data.folders import collate_readable

DATA_ERRORS = (ValueError, FileNotFoundError)


class _Failed:
    """What a worker hands back instead of a sample or a batch: the data error it met."""

    def __init__(self, error: Exception):
        self.error = error


class _Catching(Dataset):
    """dataset[i], or a _Failed holding the data error that reading it raised."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        try:
            return self.dataset[item]
        except DATA_ERRORS as err:
            return _Failed(err)


class _Collate:
    """`collate` of a batch's items, or the first _Failed among them."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items):
        return next((item for item in items if isinstance(item, _Failed)), None) or self.collate(items)


def loader_batches(dataset, skipped: Optional[set], **loader_args) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) of a DataLoader over `dataset` (loader_args: batch_size, shuffle, sampler,
    num_workers, ...). With `skipped` (a dataset's `unreadable` set) the dataset yields (None, reason)
    for undecodable images: each reason is added to `skipped`, named in a warning once, and the
    image left out of its batch."""
    collate = default_collate if skipped is None else collate_readable
    for batch in DataLoader(_Catching(dataset), collate_fn=_Collate(collate), **loader_args):
        if isinstance(batch, _Failed):
            raise batch.error
        if skipped is None:
            yield batch
            continue
        images, labels, bad = batch
        for reason in bad:
            if reason not in skipped:
                skipped.add(reason)
                warnings.warn(f"skipped an unreadable image: {reason}", stacklevel=3)
        if images is not None:
            yield images, labels
