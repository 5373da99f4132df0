"""Which images a training step sees, as a pure function of (seed, epoch, step, process).

- `holdout_split`: a validation slice held out of the training data (same slice for every seed).
- `epoch_batches`: one epoch's index batches for one process, from an order drawn from (seed, epoch)
  alone, padded like torch's DistributedSampler so every process takes the same number of steps.
- `train_batches`: the images of those batches from a given step on; random augmentation is seeded
  per batch (IDX sets) or per sample (folders, in DataLoader workers), never from a running stream.

So a run resumed at any step sees exactly the batches the uninterrupted run saw, whatever the
number of DataLoader workers.
"""
import hashlib
import random
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from mambamerge.data.datasets import IdxDataset, stratified
from mambamerge.data.workers import loader_batches

HOLDOUT_SEED = 0  # the validation slice does not move with --seed: runs with other seeds stay comparable


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def subset(dataset, index: Sequence[int]):
    """The images at `index` (an IdxDataset stays one, in memory; others become a Subset), with .info."""
    index = [int(i) for i in index]
    if isinstance(dataset, IdxDataset):
        return dataset.subset(index)
    part = Subset(dataset, index)
    part.info = dataset.info
    if hasattr(dataset, "unreadable"):
        part.unreadable = dataset.unreadable  # images skipped in any part are named in one set
    return part


def limited(index: Sequence[int], labels: Sequence[int], limit: Optional[int]) -> List[int]:
    """The `limit` of `index` (positions into a dataset whose class indices are `labels`) that
    data.datasets.stratified keeps, in its order; all of `index` when limit is None."""
    return [index[i] for i in stratified([labels[j] for j in index], limit)]


def holdout_split(n: int, val: float) -> Tuple[List[int], List[int]]:
    """(train indices, validation indices) of n training images, both sorted: a seeded random slice
    of round(val * n) images (val < 1) or of `val` images (val >= 1) is held out for validation."""
    count = int(val) if val >= 1 else max(1, round(val * n))
    if val < 0 or (val >= 1 and val != int(val)) or not 0 < count < n:
        raise ValueError(f"--val-split {val:g} holds out {count} of {n} training images; give a fraction in "
                         f"(0, 1) or a number of images between 1 and {n - 1}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return sorted(order[count:].tolist()), sorted(order[:count].tolist())


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
                  ) -> List[torch.Tensor]:
    """The index batches of process `rank` in `epoch` (the last one may be smaller)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch)))
    per_process = -(-n // world_size)
    padded = order.repeat(-(-per_process * world_size // n))[:per_process * world_size]
    mine = padded[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


class SeededSamples(Dataset):
    """dataset[(index, seed)]: dataset[index] with Python's, NumPy's and torch's generators seeded
    from `seed` first, so a transform's random choices depend on the sample, not on the worker."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        return self.dataset[index]


def train_batches(dataset, batches: List[torch.Tensor], seed: int, epoch: int, start: int = 0,
                  workers: int = 0, pin_memory: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of batches[start:], augmented reproducibly (see the module docstring)."""
    if isinstance(dataset, IdxDataset):
        for k in range(start, len(batches)):
            yield dataset.batch(batches[k], torch.Generator().manual_seed(derive_seed(seed, "augment", epoch, k,
                                                                                      int(batches[k][0]))))
        return
    plan = [[(int(i), derive_seed(seed, "sample", epoch, int(i))) for i in batch] for batch in batches[start:]]
    if not plan:
        return
    yield from loader_batches(SeededSamples(dataset), getattr(dataset, "unreadable", None), batch_sampler=plan,
                              num_workers=workers, pin_memory=pin_memory)
