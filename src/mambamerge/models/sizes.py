"""Sizes written once for every family: bounded whole numbers and pairs read from options or a file's
metadata (so that neither can make a model allocate without limit), and the patch-grid formula."""
from typing import Sequence, Tuple

MAX_SIZE = 1 << 16  # the largest size (pixels, frames, mel bins) or stride an option or a file may give
MAX_PIXELS = 16384  # the largest image or frame side (and stride) an option or a file may give


def whole(value, what: str, most: int = MAX_SIZE) -> int:
    """A whole number from 1 to `most`, else a ValueError naming `what`."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise ValueError(f"{what} is {value!r}: expected a whole number from 1 to {most}")
    return value


def pair(value, what: str, most: int = MAX_SIZE, unit: str = "") -> Tuple[int, int]:
    """An int or a pair of them, each from 1 to `most`, as a pair; else a ValueError naming `what`
    (`unit`, e.g. " of pixels", says what the numbers count)."""
    items = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(items, (list, tuple)) or len(items) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= most for v in items)):
        raise ValueError(f"{what} is {value!r}: expected a whole number{unit} from 1 to {most} or a pair of them")
    return int(items[0]), int(items[1])


def patch_grid(size: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> Tuple[int, ...]:
    """Patches along each axis of an input of `size` cut into `patch`-sized windows every `stride`."""
    return tuple((i - p) // s + 1 for i, p, s in zip(size, patch, stride))
