"""Where the patches of a token layout lie on the input, for pictures of images, spectrograms and clips.

Every family embeds its input with one convolution whose spatial axes are the token grid's axes in
grid order: Vim's Conv2d over an image (row, col); AuM's Conv2d over the transposed spectrogram
(freq, time), overlapping when its stride is below its kernel; VideoMamba's Conv3d over a clip
(frame, row, col), the tubelet as the frame kernel. Its kernel, stride and padding (`PatchGeometry`)
say which input positions each patch covers. An input is laid out along the grid axes (`grid_planes`),
and per-patch values are spread over those positions (`spread`): each position takes the value of
the patch whose centre is nearest along every axis; positions no patch covers (what a stride that does
not divide the input leaves at the end, or gaps between patches) take `fill`.
"""
import itertools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from mambamerge.tokens import TokenLayout

# the axes of one input, model.input_shape's order, for each model.input_kind: (C, H, W) images,
# (C, T, H, W) clips, (T, F) spectrograms; the token layout names its grid axes from these
INPUT_AXES = {"images": ("channel", "row", "col"), "clips": ("channel", "frame", "row", "col"),
              "spectrograms": ("time", "freq")}


class PatchGeometry(NamedTuple):
    """Kernel, stride and padding of the patch embedding, one entry per grid axis, grid order."""

    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]


def patch_geometry(model) -> PatchGeometry:
    """The geometry of model.patch_embed.proj, the convolution every family embeds its patches with."""
    conv = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)) or len(conv.kernel_size) != len(model.layout.grid):
        raise ValueError(f"the pictures need a patch embedding convolution patch_embed.proj over the "
                         f"{len(model.layout.grid)} grid axes ({model.layout.describe()}); this model has none")
    if isinstance(conv.padding, str):
        raise ValueError(f"patch_embed.proj pads {conv.padding!r}; the pictures need its padding in numbers")
    return PatchGeometry(tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding))


def input_axes(inputs: torch.Tensor, layout: TokenLayout, kind: str) -> Tuple[str, ...]:
    """The axes of one of `inputs` (B, *input_shape), a batch of `kind` (model.input_kind), checked to fit
    `layout`."""
    names = INPUT_AXES.get(kind, ())
    if len(names) != inputs.dim() - 1 or set(layout.axes) | {"channel"} != set(names) | {"channel"}:
        raise ValueError(f"{kind} of shape {tuple(inputs.shape[1:])} do not fit a layout of {layout.describe()}")
    return names


def grid_planes(inputs: torch.Tensor, layout: TokenLayout, kind: str) -> torch.Tensor:
    """inputs (B, *input_shape) of `kind` (model.input_kind) -> (B, *extent): channels averaged, axes put
    in the grid's order (an image (B, H, W), a spectrogram (B, F, T), a clip (B, T, H, W))."""
    names = input_axes(inputs, layout, kind)
    x = inputs.float()
    if "channel" in names:
        x = x.mean(dim=1 + names.index("channel"))
        names = tuple(n for n in names if n != "channel")
    return x.permute(0, *(1 + names.index(axis) for axis in layout.axes))


def pixel_owners(extent: int, count: int, kernel: int, stride: int, padding: int = 0) -> torch.Tensor:
    """(extent,) long: along one axis, the index of the patch (of `count`) whose centre is nearest each
    position, -1 where that patch does not cover it."""
    if (extent + 2 * padding - kernel) // stride + 1 != count:
        raise ValueError(f"{count} patches of kernel {kernel}, stride {stride}, padding {padding} do not span "
                         f"{extent} positions")
    position = torch.arange(extent, dtype=torch.float64)
    nearest = torch.round((position + padding - (kernel - 1) / 2) / stride).long().clamp(0, count - 1)
    start = nearest * stride - padding
    covered = (position >= start) & (position < start + kernel)
    return torch.where(covered, nearest, -1)


def spread(values: torch.Tensor, grid: Sequence[int], geometry: PatchGeometry, extent: Sequence[int],
           fill: float = float("nan")) -> torch.Tensor:
    """Per-patch values (B, M, *rest), patches in grid order, at the input positions: (B, *extent, *rest)."""
    owners = [pixel_owners(e, g, k, s, p) for e, g, k, s, p in zip(extent, grid, *geometry)]
    flat = torch.zeros(tuple(extent), dtype=torch.long)
    covered = torch.ones(tuple(extent), dtype=torch.bool)
    for axis, owner in enumerate(owners):
        shape = [1] * len(owners)
        shape[axis] = -1
        flat = flat * grid[axis] + owner.clamp(min=0).view(shape)
        covered &= owner.view(shape) >= 0
    out = values[:, flat.to(values.device)].clone()
    out[:, ~covered.to(values.device)] = fill
    return out


def leading_panels(extent: Sequence[int], layout: TokenLayout, geometry: PatchGeometry) -> List[Tuple[int, str]]:
    """The pictures worth drawing along the grid axes before the last two (a clip's frames): one per
    patch position there, the first input position it covers, as (flat index into extent[:-2], label),
    e.g. (2, "frame 2-3") for the second tubelet of two frames. [(0, "")] when there are none."""
    lead = len(layout.grid) - 2
    choices = []
    for axis in range(lead):
        owner = pixel_owners(extent[axis], layout.grid[axis], *(g[axis] for g in geometry))
        choices.append([(int((owner == i).nonzero()[0]), int((owner == i).nonzero()[-1]), layout.axes[axis])
                        for i in range(layout.grid[axis])])
    panels = []
    for combination in itertools.product(*choices):
        flat = 0
        for axis, (first, _, _) in enumerate(combination):
            flat = flat * extent[axis] + first
        label = ", ".join(f"{name} {first}" + (f"-{last}" if last > first else "") for first, last, name in combination)
        panels.append((flat, label))
    return panels


def group_colours(groups: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One random colour per group id. groups (..., M) long, -1 for dropped -> (..., M, 3) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    palette = 0.15 + 0.85 * torch.rand(int(groups.max()) + 2, 3, generator=generator)
    return torch.where(groups[..., None] < 0, torch.zeros(3), palette[groups.clamp(min=0)])


def shade(planes: torch.Tensor) -> torch.Tensor:
    """Each input scaled to [0, 1] over all its positions: (B, *extent) -> (B, *extent)."""
    flat = planes.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    scale = (high - low).clamp(min=1e-12)
    return (planes - low.view(-1, *[1] * (planes.dim() - 1))) / scale.view(-1, *[1] * (planes.dim() - 1))


def group_pictures(planes: torch.Tensor, groups: torch.Tensor, grid: Sequence[int],
                   geometry: PatchGeometry) -> torch.Tensor:
    """The input in grey under one colour per group: planes (B, *extent) from grid_planes, groups (B, M)
    -> RGB (B, *extent, 3) in [0, 1]; positions no patch covers stay grey, dropped patches darken."""
    grey = shade(planes)[..., None]
    colours = spread(group_colours(groups), grid, geometry, planes.shape[1:])
    blended = 0.55 * colours + 0.45 * grey
    return torch.where(colours.isnan(), grey.expand_as(blended), blended)


def colour_planes(inputs: torch.Tensor, layout: TokenLayout, kind: str, mean: Sequence[float],
                  std: Sequence[float]) -> Optional[torch.Tensor]:
    """3-channel inputs (B, 3, H, W) images or (B, 3, T, H, W) clips (`kind`: model.input_kind),
    normalised with `mean` and `std`, as RGB pictures along the grid axes: (B, *extent, 3) in [0, 1];
    None for inputs of other channels."""
    names = input_axes(inputs, layout, kind)
    if "channel" not in names or inputs.shape[1] != 3:
        return None
    shape = (1, 3) + (1,) * (inputs.dim() - 2)
    pixels = inputs.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    order = [1 + names.index(axis) for axis in layout.axes]
    return pixels.permute(0, *order, 1).clamp(0, 1)


def class_token_mark(layout: TokenLayout, geometry: PatchGeometry,
                     extent: Sequence[int]) -> Optional[Tuple[int, float, float]]:
    """Where the class token sits in the scan, drawn at the leading edge of the patch that follows it:
    (panel number as leading_panels counts them, row, column) in picture coordinates, None without a
    class token. Vim and AuM put it in the middle of the patches, VideoMamba at the head."""
    if layout.cls_index is None:
        return None
    after = min(layout.cls_index, layout.num_patches - 1)
    position = []
    for size in reversed(layout.grid):
        position.insert(0, after % size)
        after //= size
    kernel, stride, padding = geometry
    panel = 0
    for axis in range(len(layout.grid) - 2):
        panel = panel * layout.grid[axis] + position[axis]
    start = [position[a] * stride[a] - padding[a] for a in (-2, -1)]
    return panel, start[0] + (kernel[-2] - 1) / 2, start[1] - 0.5
