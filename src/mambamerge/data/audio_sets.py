"""Audio datasets as (features (frames, 128), label): folders of sound files and the Free Spoken Digit
Dataset (FSDD). Features are computed once, at load time, by mambamerge.data.audio.

FSDD (github.com/Jakobovski/free-spoken-digit-dataset, CC BY-SA 4.0): files `{digit}_{speaker}_{take}.wav`,
8 kHz mono, 6 speakers x 10 digits x 50 takes. Splits: test = takes 0-4 (the official split; these
300 clips ship with the package, losslessly as FLAC, in assets/fsdd/), val = takes 45-49 (held out of
the official training takes, for choosing settings), train = takes 5-44.
"""
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from mambamerge.data.audio import NUM_MEL_BINS, audio_features
from mambamerge.data.datasets import class_folders, stratified

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
DEMO_FRAMES = 128  # 1.285 s at 10 ms a frame: all but 3 of the 3,000 FSDD clips fit whole
FSDD_TAKES = {"test": range(0, 5), "val": range(45, 50), "train": range(5, 45)}
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.(wav|flac)$")


@dataclass
class AudioInfo:
    """What a model needs to know about an audio dataset: classes and the feature shape."""

    input_kind = "spectrograms"  # as the models name theirs (MambaClassifier.input_kind)

    classes: List[str]
    frames: int
    bins: int = NUM_MEL_BINS

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> Tuple[int, int]:
        """Shape of one input: (frames, mel bins)."""
        return (self.frames, self.bins)


class AudioClips(Dataset):
    """Sound files as normalised log-mel features (frames, bins), all computed when built.

    files: paths; labels: class indices; augment: SpecAugment-style masking in `batch` (one band of
    up to 24 mel bins and one span of up to 16 frames per clip set to 0)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], classes: List[str], frames: int,
                 augment: bool = False, desc: str = "features"):
        if frames < 1:
            raise ValueError(f"frames must be at least 1, got {frames}")
        self.files = [Path(f) for f in files]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.info = AudioInfo(list(classes), frames)
        self.augment = augment
        rows = [audio_features(f, frames) for f in tqdm(self.files, desc=desc, unit="clip", leave=False,
                                                        disable=len(self.files) < 200)]
        self.features = torch.stack(rows) if rows else torch.zeros(0, frames, NUM_MEL_BINS)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: Sequence[int], generator: Optional[torch.Generator] = None):
        """Features (B, frames, bins) and labels (B,) for a list of indices."""
        index = torch.as_tensor(index, dtype=torch.long)
        x = self.features[index]
        if self.augment:
            x = _mask(x, generator)
        return x, self.labels[index]

    def __getitem__(self, i: int):
        x, y = self.batch([i])
        return x[0], y[0]


def _mask(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """x (B, T, F): zero one random band of < 24 bins and one random span of < 16 frames per clip."""
    batch, frames, bins = x.shape

    def band(size: int, widest: int) -> torch.Tensor:
        width = torch.randint(0, min(widest, size) + 1, (batch, 1), generator=generator)
        start = (torch.rand(batch, 1, generator=generator) * (size - width + 1)).long()
        position = torch.arange(size)[None]
        return (position >= start) & (position < start + width)

    keep = ~(band(frames, 16)[:, :, None] | band(bins, 24)[:, None, :])
    return x * keep


def audio_folder(root, frames: int = DEMO_FRAMES, limit: Optional[int] = None, augment: bool = False,
                 start: int = 0) -> AudioClips:
    """A folder `<root>/<class name>/<sound files>` (label = sub-folder name, classes sorted; files in
    class then name order; `limit` of them chosen by data.datasets.stratified)."""
    root, classes = class_folders(root, "<sound files>")
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
                files.append(path)
                labels.append(label)
    if not files:
        raise ValueError(f"{root}: no sound files found in its class folders; supported extensions: "
                         f"{', '.join(AUDIO_EXTENSIONS)}")
    keep = stratified(labels, limit, start)
    return AudioClips([files[i] for i in keep], [labels[i] for i in keep], classes, frames, augment, desc=root.name)


def shipped_fsdd() -> Path:
    """The FSDD test clips shipped with the package."""
    return Path(str(resources.files("mambamerge") / "assets" / "fsdd"))


def _fsdd_root(split: str) -> Path:
    candidates = []
    if os.environ.get("MAMBAMERGE_DATA"):
        data = Path(os.environ["MAMBAMERGE_DATA"]) / "fsdd"
        candidates += [data / "recordings", data]
    if split == "test":
        candidates.append(shipped_fsdd())
    for folder in candidates:
        if folder.is_dir() and any(_FSDD_NAME.match(p.name) for p in folder.iterdir()):
            return folder
    looked = ", ".join(str(c) for c in candidates) or "nowhere ($MAMBAMERGE_DATA is not set)"
    raise FileNotFoundError(f"no FSDD {split} recordings found (looked in {looked}); only the test takes ship "
                            f"with the package: pass the folder of the Free Spoken Digit Dataset's recordings "
                            f"as fsdd:/path/to/recordings")


def fsdd(split: str = "test", root=None, frames: int = DEMO_FRAMES, limit: Optional[int] = None,
         augment: bool = False, start: int = 0) -> AudioClips:
    """The FSDD clips of a split (see the module docstring), ordered by take, speaker, digit; `limit` of
    them chosen by data.datasets.stratified (so the first takes of every speaker and digit). root: the
    folder of `{digit}_{speaker}_{take}.wav|flac` files."""
    if split not in FSDD_TAKES:
        raise ValueError(f"FSDD splits are {', '.join(FSDD_TAKES)}, got {split!r}")
    folder = Path(root) if root else _fsdd_root(split)
    if not folder.is_dir():
        raise FileNotFoundError(f"FSDD folder not found: {folder}")
    clips = []
    for path in folder.iterdir():
        match = _FSDD_NAME.match(path.name)
        if match and int(match.group(3)) in FSDD_TAKES[split]:
            clips.append((int(match.group(3)), match.group(2), int(match.group(1)), path))
    if not clips:
        raise ValueError(f"{folder}: no FSDD files of the {split} split (takes {FSDD_TAKES[split].start}-"
                         f"{FSDD_TAKES[split].stop - 1}, named digit_speaker_take.wav)")
    clips.sort()
    clips = [clips[i] for i in stratified([c[2] for c in clips], limit, start)]
    return AudioClips([c[3] for c in clips], [c[2] for c in clips], [str(d) for d in range(10)], frames, augment,
                      desc=f"fsdd {split}")
