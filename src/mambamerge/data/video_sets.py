"""Video datasets as (clip (C, T, H, W), label): folders of videos or of frame folders, and the
generated moving Fashion-MNIST / MNIST task of the video demo.

Moving items (`moving-fashion-mnist`, `moving-mnist`): each clip shows one Fashion-MNIST (or MNIST)
item, shrunk to 16x16, crossing a black 32x32 canvas in a straight line at 2 pixels a frame for 8
frames, to the right, left, down or up. The label is (item class, direction): 40 classes, so a model
needs both the appearance and the motion. The start lies on the canvas so that the whole path does
(3 positions along the motion, 17 across it). Items: train = the first 58,000 of the IDX train
split, val = the last 2,000 (held out, for choosing settings), test = the IDX test split (shipped
with the package for Fashion-MNIST). Each split's directions and starts are drawn from a generator
seeded with `seed` and the split, so clips are the same on every machine (and a `limit` keeps some
of the same clips, data.datasets.stratified over the 40 classes); with `augment` every batch draws new
ones (an endless stream of training clips).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mambamerge.data.datasets import IDX_SETS, class_folders, locate_idx, stratified
from mambamerge.data.idx import read_idx
from mambamerge.data.video import clip_sources, clip_tensor, read_frame_folder, read_video

DIRECTIONS = ("right", "left", "down", "up")
_STEP = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (dy, dx) per frame, in units of speed
MOVING_SETS = {f"moving-{name}": name for name in IDX_SETS}
_SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


@dataclass
class VideoInfo:
    """What a model needs to know about a video dataset: classes and the clip shape."""

    input_kind = "clips"  # as the models name theirs (MambaClassifier.input_kind)

    classes: List[str]
    in_chans: int
    frames: int
    img_size: Tuple[int, int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        """Shape of one input: (channels, frames, height, width)."""
        return (self.in_chans, self.frames, *self.img_size)


class VideoFolder(Dataset):
    """`<root>/<class name>/<clip>`, a clip being a video file (PyAV) or a folder of frame images;
    label = class folder name (sorted). Clips are decoded when indexed (data.video)."""

    def __init__(self, root, frames: int, size: int, in_chans: int = 3):
        root, classes = class_folders(root, "<video files or folders of frames>")
        self.clips = [(clip, label) for label, name in enumerate(classes) for clip in clip_sources(root / name)]
        if not self.clips:
            raise ValueError(f"{root}: no video files or frame folders in its class folders")
        self.targets = [label for _, label in self.clips]
        self.frames, self.size, self.in_chans = frames, size, in_chans
        self.info = VideoInfo(classes, in_chans, frames, (size, size))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int):
        path, label = self.clips[i]
        rgb = read_frame_folder(path, self.frames) if path.is_dir() else read_video(path, self.frames)
        return clip_tensor(rgb, self.size, self.in_chans), label


class MovingItems(Dataset):
    """The moving Fashion-MNIST / MNIST task (module docstring): clips (1, 8, 32, 32), labels
    class * 4 + direction index (DIRECTIONS)."""

    FRAMES, SIZE, ITEM, SPEED = 8, 32, 16, 2

    def __init__(self, name: str, split: str = "test", root=None, seed: int = 0, limit: Optional[int] = None,
                 augment: bool = False, start: int = 0):
        if name not in IDX_SETS:
            raise ValueError(f"unknown item set {name!r}; known: {', '.join(IDX_SETS)}")
        if split not in _SPLIT_SEED:
            raise ValueError(f"moving-{name} splits are {', '.join(_SPLIT_SEED)}, got {split!r}")
        images_path, labels_path = locate_idx(name, "test" if split == "test" else "train", root)
        images, labels = read_idx(images_path), read_idx(labels_path).long()
        if split != "test":
            part = slice(0, 58000) if split == "train" else slice(58000, None)
            images, labels = images[part], labels[part]
        gen = torch.Generator().manual_seed(seed * len(_SPLIT_SEED) + _SPLIT_SEED[split])
        directions, starts = self._draw(len(labels), gen)  # for the whole split: a limit keeps the same clips
        keep = torch.tensor(stratified((labels * len(DIRECTIONS) + directions).tolist(), limit, start), dtype=torch.long)
        images, self.item_labels, self.directions, self.starts = images[keep], labels[keep], directions[keep], starts[keep]
        self.items = F.interpolate(images[:, None].float().div_(255.0), size=(self.ITEM, self.ITEM), mode="area")[:, 0]
        self.augment = augment
        self.info = VideoInfo([f"{c}, {d}" for c in IDX_SETS[name] for d in DIRECTIONS], 1, self.FRAMES,
                              (self.SIZE, self.SIZE))

    def __len__(self) -> int:
        return len(self.item_labels)

    @property
    def labels(self) -> torch.Tensor:
        return self.item_labels * len(DIRECTIONS) + self.directions

    def _draw(self, n: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Directions (n,) and start corners (n, 2) = (y, x) such that the whole path is on the canvas."""
        directions = torch.randint(0, len(DIRECTIONS), (n,), generator=gen)
        room = self.SIZE - self.ITEM
        travel = (self.FRAMES - 1) * self.SPEED
        across = torch.randint(0, room + 1, (n,), generator=gen)
        along = torch.randint(0, room - travel + 1, (n,), generator=gen)
        backwards = (directions == DIRECTIONS.index("left")) | (directions == DIRECTIONS.index("up"))
        along = torch.where(backwards, room - along, along)
        vertical = (directions == DIRECTIONS.index("down")) | (directions == DIRECTIONS.index("up"))
        starts = torch.stack([torch.where(vertical, along, across), torch.where(vertical, across, along)], 1)
        return directions, starts

    def render(self, items: torch.Tensor, directions: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """items (B, 16, 16) in [0, 1], directions (B,), starts (B, 2) -> clips (B, 1, 8, 32, 32),
        normalised as grey video frames ((x - 0.5) / 0.5)."""
        batch, frames, item = len(items), self.FRAMES, self.ITEM
        steps = torch.tensor([_STEP[d] for d in DIRECTIONS])[directions] * self.SPEED  # (B, 2)
        corners = starts[:, None] + torch.arange(frames)[None, :, None] * steps[:, None]  # (B, T, 2)
        rows = corners[..., 0, None, None] + torch.arange(item)[:, None]  # (B, T, item, 1)
        cols = corners[..., 1, None, None] + torch.arange(item)[None, :]  # (B, T, 1, item)
        canvas = torch.zeros(batch, frames, self.SIZE, self.SIZE)
        b = torch.arange(batch)[:, None, None, None]
        t = torch.arange(frames)[None, :, None, None]
        canvas[b, t, rows, cols] = items[:, None].expand(batch, frames, item, item)
        return ((canvas - 0.5) / 0.5)[:, None]

    def batch(self, index: Sequence[int], generator: Optional[torch.Generator] = None):
        """Clips (B, 1, 8, 32, 32) and labels (B,); with augment, fresh directions and starts."""
        index = torch.as_tensor(index, dtype=torch.long)
        if self.augment:
            directions, starts = self._draw(len(index), generator)
        else:
            directions, starts = self.directions[index], self.starts[index]
        clips = self.render(self.items[index], directions, starts)
        return clips, self.item_labels[index] * len(DIRECTIONS) + directions

    def __getitem__(self, i: int):
        x, y = self.batch([i])
        return x[0], y[0]
