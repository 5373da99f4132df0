"""Size bounds checked from a file's header, before anything is decoded or resized: a few hundred bytes
must not make a loader allocate gigabytes.

- Pictures (image files, video frames): at most MAX_PIXELS pixels (Pillow's decompression-bomb
  threshold) and sides within 1:MAX_ASPECT. The ratio bounds the resized tensor: resizing the short
  side to the model's resolution S makes S x S x ratio pixels, so a 275-byte 200000x1 PNG would
  become a tensor of 256 x 51,200,000 pixels.
- Directories are walked without following links to folders (a `ln -s .` loop would repeat the
  folder for ever), and only regular files are taken (a FIFO named x.png would block the read).
"""
import os
import stat
import warnings
from pathlib import Path
from typing import Iterator, List

from PIL import Image

MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: above it Pillow warns of a decompression bomb
MAX_ASPECT = 32


def check_picture(source, width: int, height: int) -> None:
    """A ValueError naming `source` when a width x height picture is outside the bounds above."""
    if width < 1 or height < 1:
        raise ValueError(f"{source}: has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{source}: {width}x{height} is {width * height:,} pixels, more than the {MAX_PIXELS:,} "
                         f"that inputs may hold; downscale it first")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        raise ValueError(f"{source}: {width}x{height} has sides in ratio {ratio:,.0f}:1; inputs may be at most "
                         f"{MAX_ASPECT}:1 (resizing its short side to the model's resolution would make a tensor "
                         f"{ratio:,.0f} times the model's input); crop it first")


def open_picture(path) -> Image.Image:
    """An image file opened (header only, nothing decoded yet) and checked against the bounds above;
    Pillow's own decompression-bomb error or warning becomes that check's ValueError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as err:
            raise ValueError(f"{path}: {err}; inputs may hold at most {MAX_PIXELS:,} pixels: downscale it first") \
                from None
    try:
        check_picture(path, *image.size)
    except ValueError:
        image.close()
        raise
    return image


def is_regular(path) -> bool:
    """Whether `path` is (or links to) a regular file: not a FIFO, device, socket or folder."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def walk_files(folder, skipped_links: List[Path]) -> Iterator[Path]:
    """The regular files under `folder`, in sorted path order, descending into sub-folders but not
    into links to folders (appended to `skipped_links`)."""
    for top, dirs, files in sorted(os.walk(folder, followlinks=False)):
        skipped_links.extend(Path(top, d) for d in sorted(dirs) if os.path.islink(os.path.join(top, d)))
        for name in sorted(files):
            if is_regular(os.path.join(top, name)):
                yield Path(top, name)
