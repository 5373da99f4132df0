"""A --data value parsed once, and the names of the data sets that ship with mambamerge. Imports no torch,
so that the command line's `--help` and argument errors stay instant; mambamerge.data holds the sets
themselves (tests/test_cli_startup.py checks that the names agree)."""
from dataclasses import dataclass
from typing import Optional

IDX_SETS = ("fashion-mnist", "mnist")  # images in IDX files (mambamerge.data.IDX_SETS)
VAL_SPLIT_SETS = ("fsdd", "moving-fashion-mnist", "moving-mnist")  # with a val split (mambamerge.data.VAL_SPLIT_SETS)
NAMED_SETS = (*IDX_SETS, *VAL_SPLIT_SETS)


@dataclass(frozen=True)
class DataSpec:
    """A --data value: a named set ("fsdd", optionally "fsdd:/folder/with/its/files") or a folder with one
    sub-folder per class (name None)."""
    text: str
    name: Optional[str]
    root: Optional[str]

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        name, colon, root = text.partition(":")
        if name not in NAMED_SETS:
            return cls(text, None, None)
        return cls(text, name, root if colon else None)

    @property
    def named(self) -> bool:
        """A named set (train / test splits, and val for VAL_SPLIT_SETS), not a user's folder."""
        return self.name is not None

    @property
    def is_idx(self) -> bool:
        """Fashion-MNIST / MNIST: IDX image files."""
        return self.name in IDX_SETS

    @property
    def has_val_split(self) -> bool:
        """A named set with a validation split held out of its training data (clips, spoken digits)."""
        return self.name in VAL_SPLIT_SETS
