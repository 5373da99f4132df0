"""Video front end of VideoMamba: video files (PyAV) or folders of frame images to clips (C, T, H, W).

- Frame sampling: the clip is cut into T equal segments and the middle frame of each is taken
  (VideoMamba's evaluation sampling). A clip with fewer than T frames is a ValueError naming the file
  and both counts: frames are never repeated to make up the number.
- Frames: resized (bilinear) so that the short side is `size`, centre-cropped to size x size.
- Normalisation: ImageNet mean / std for RGB (3 channels, as VideoMamba), (x - 0.5) / 0.5 for grey
  (1 channel, frames converted with ITU-R 601 luma weights).
"""
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mambamerge.data.bounds import check_picture, open_picture

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)


def segment_middles(available: int, frames: int, source: str = "the clip") -> List[int]:
    """Indices of the middle frames of `frames` equal segments of `available` frames."""
    if available < frames:
        raise ValueError(f"{source} has {available} frames but the model takes {frames}; use clips of at least "
                         f"{frames} frames (or a model built for fewer frames)")
    return [int((i + 0.5) * available / frames) for i in range(frames)]


def read_video(path, frames: int) -> np.ndarray:
    """`frames` RGB frames (T, H, W, 3) uint8 of a video file, sampled as in the module docstring.
    The frames are counted from the packets (nothing decoded), then decoded as a stream keeping only
    the chosen ones, so memory does not grow with the clip's length. Files PyAV cannot open, that hold
    no video stream, whose frames exceed data.bounds or change size are ValueErrors naming the file."""
    import av

    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: is empty (0 bytes)")
    try:
        with open(path, "rb") as file, av.open(file) as container:
            count = sum(1 for packet in container.demux(_video_stream(container, path)) if packet.size)
        chosen = segment_middles(count, frames, str(path))
        with open(path, "rb") as file, av.open(file) as container:
            picked, decoded = _decode_chosen(container, _video_stream(container, path), chosen, path)
        if len(picked) < frames:  # fewer frames decode than packets were stored: sample the decoded ones
            chosen = segment_middles(decoded, frames, str(path))
            with open(path, "rb") as file, av.open(file) as container:
                picked, _ = _decode_chosen(container, _video_stream(container, path), chosen, path)
    except (av.error.FFmpegError, OSError) as err:
        raise ValueError(f"{path}: cannot be decoded as a video ({err or type(err).__name__})") from None
    return np.stack(picked)


def _video_stream(container, path: Path):
    """The first video stream of an open container, its frame size checked (data.bounds)."""
    if not container.streams.video:
        raise ValueError(f"{path}: holds no video stream (audio only, or cut before its list of streams)")
    stream = container.streams.video[0]
    check_picture(path, stream.codec_context.width, stream.codec_context.height)
    return stream


def _decode_chosen(container, stream, chosen: Sequence[int], path: Path):
    """(RGB arrays of the frames at the sorted indices `chosen`, frames decoded): decoding stops at
    the last chosen frame; every frame must have the first one's size."""
    wanted, picked, size, decoded = set(chosen), [], None, 0
    for decoded, frame in enumerate(container.decode(stream), 1):
        size = size or (frame.width, frame.height)
        if (frame.width, frame.height) != size:
            raise ValueError(f"{path}: its frames change size ({size[0]}x{size[1]}, then {frame.width}x"
                             f"{frame.height} at frame {decoded - 1}); re-encode it at one size")
        if decoded - 1 in wanted:
            picked.append(frame.to_ndarray(format="rgb24"))
            if len(picked) == len(wanted):
                break
    return picked, decoded


def frame_files(folder) -> List[Path]:
    """The frame images of a folder, in name order."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and p.is_file())


def read_frame_folder(folder, frames: int) -> np.ndarray:
    """`frames` RGB frames (T, H, W, 3) uint8 from a folder of frame images (name order), sampled as
    in the module docstring. Frames of different sizes, beyond data.bounds or unreadable are ValueErrors."""
    files = frame_files(folder)
    chosen = [files[i] for i in segment_middles(len(files), frames, str(folder))]
    images = []
    for path in chosen:
        try:
            with open_picture(path) as image:
                images.append(np.asarray(image.convert("RGB")))
        except OSError as err:
            raise ValueError(f"{path}: cannot be read as an image ({err})") from None
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"{folder}: its frames differ in size ({sorted({image.shape[:2] for image in images})})")
    return np.stack(images)


def clip_tensor(frames: np.ndarray, size: int, in_chans: int = 3) -> torch.Tensor:
    """RGB frames (T, H, W, 3) uint8 -> normalised clip (in_chans, T, size, size), as in the module
    docstring."""
    if in_chans not in (1, 3):
        raise ValueError(f"video clips are RGB (3 channels) or grey (1), not {in_chans}")
    height, width = frames.shape[1:3]
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    x = torch.stack([_resize_crop(frame, resized, top, left, size) for frame in frames])  # (T, 3, size, size)
    if in_chans == 1:
        x = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        mean, std = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.5)
    else:
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).transpose(0, 1).contiguous()


def _resize_crop(frame: np.ndarray, resized: Tuple[int, int], top: int, left: int, size: int) -> torch.Tensor:
    """One RGB frame (H, W, 3) uint8 -> (3, size, size) in [0, 1]: resized, then cropped at (top, left);
    frame by frame, so a clip of large frames never sits in memory as floats at full size."""
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().div_(255.0)[None]
    if resized != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=resized, mode="bilinear", align_corners=False, antialias=True)
    return x[0, :, top:top + size, left:left + size]


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def has_frames(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in FRAME_EXTENSIONS for p in path.iterdir())


def clip_sources(class_folder: Path) -> Sequence[Path]:
    """The clips of a class folder: its video files and its sub-folders of frame images, by name."""
    return sorted(p for p in class_folder.iterdir() if is_video_file(p) or has_frames(p))
