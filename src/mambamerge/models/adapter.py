"""How a family reads its checkpoints: the `CheckpointAdapter` interface, its registry (the
`register_adapter` decorator, used next to each family's model) and the helpers every adapter shares.

An adapter raises ValueError with the reason; mambamerge.checkpoint names the file and loads strictly.
"""
import re
from dataclasses import replace
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

_MAX_LISTED = 8

# family -> its adapter, in registration order (the order in which files are matched)
ADAPTERS: Dict[str, "CheckpointAdapter"] = {}


class CheckpointAdapter:
    """The reader of one family's checkpoints: recognise its tensors, infer the architecture from them
    and adapt the position tables to the input size asked for.

    Subclasses set `model_class` (its `family` names the adapter), `title` (the family in words) and
    `takes` (the options it accepts, in words), and define `matches`, `infer` and `adapt`. One adapter
    may set `fallback`: files no adapter matches go to it, and its `infer` says what they lack.
    """

    model_class: type
    title: str
    takes: str
    fallback = False

    @property
    def family(self) -> str:
        return self.model_class.family

    def matches(self, state_dict: Dict[str, torch.Tensor]) -> bool:
        """Whether the tensors have this family's official keys."""
        raise NotImplementedError

    def infer(self, raw, **options) -> Tuple[object, Tuple[int, ...]]:
        """(config to build, the token grid the file's position tables hold) of a RawCheckpoint `raw`."""
        raise NotImplementedError

    def adapt(self, state_dict: Dict[str, torch.Tensor], grid: Tuple[int, ...], cfg) -> Dict[str, torch.Tensor]:
        """The tensors with the position tables resized from `grid` to the grid of `cfg` (a new dict)."""
        raise NotImplementedError

    def weights(self, raw, **options):
        """(config, trained grid, state dict adapted to the config), every tensor checked against the
        shapes of the model the config describes before that model is built."""
        cfg, grid = self.infer(raw, **options)
        state = self.adapt(raw.state_dict, grid, cfg)
        compare_shapes(expected_shapes(self.model_class, cfg), state)
        return cfg, grid, state

    def from_state_dict(self, raw, **options):
        """The model `raw` describes with its weights loaded strictly, built for `options`."""
        cfg, _, state = self.weights(raw, **options)
        model = self.model_class(cfg)
        model.load_state_dict(state, strict=True)
        return model

    def refuse(self, unknown: dict) -> None:
        """A ValueError naming the options this family does not take, if any."""
        if unknown:
            article = "an" if self.title[0] in "AEIOU" else "a"
            raise ValueError(f"unknown option(s) for {article} {self.title} checkpoint: {', '.join(sorted(unknown))}; "
                             f"{self.takes}")


def register_adapter(cls: type) -> type:
    """Class decorator: registers an instance of the CheckpointAdapter subclass under its family."""
    ADAPTERS[cls.model_class.family] = cls()
    return cls


def adapter_for(state_dict: Dict[str, torch.Tensor]) -> CheckpointAdapter:
    """The adapter whose family's official keys the tensors have, else the fallback one."""
    return next((a for a in ADAPTERS.values() if a.matches(state_dict)),
                next(a for a in ADAPTERS.values() if a.fallback))


def family_title(family: str) -> str:
    """The family in words ("Vision Mamba (Vim)"), or its short name when it is not registered."""
    return ADAPTERS[family].title if family in ADAPTERS else family


def listing(keys, shapes=None) -> str:
    """The first few of `keys` (sorted; with their `shapes` when given) and how many more."""
    keys = sorted(keys)
    shown = [f"{k} {shapes[k]}" if shapes else k for k in keys[:_MAX_LISTED]]
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(shown) + more


def depth_of(sd: Dict[str, torch.Tensor]) -> int:
    """Number of blocks; they must be numbered 0 to depth - 1 without gaps."""
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    if not blocks:
        raise ValueError("the file has no blocks (no layers.{i}.* keys)")
    if blocks != list(range(len(blocks))):
        raise ValueError(f"the file has tensors for {len(blocks)} blocks numbered from {blocks[0]} to {blocks[-1]}, "
                         f"not 0 to depth - 1 without gaps: the file is damaged")
    return len(blocks)


def mixer_config(sd: Dict[str, torch.Tensor], embed_dim: int) -> dict:
    """d_state, d_conv, expand, dt_rank of block 0's mixer."""
    d_inner = sd["layers.0.mixer.in_proj.weight"].shape[0] // 2
    if d_inner == 0 or d_inner % embed_dim:
        raise ValueError(f"in_proj has {2 * d_inner} outputs, not a multiple of 2 x embed_dim={embed_dim}")
    return dict(d_state=sd["layers.0.mixer.A_log"].shape[1], d_conv=sd["layers.0.mixer.conv1d.weight"].shape[-1],
                expand=d_inner // embed_dim, dt_rank=sd["layers.0.mixer.dt_proj.weight"].shape[1])


def require(sd: Dict[str, torch.Tensor], dims: Dict[str, int], family: str) -> None:
    """The tensors the architecture is read from: present, with dims[key] non-empty axes (the head,
    which a backbone file may lack, is checked when present)."""
    missing = [k for k in dims if k not in sd]
    if missing:
        raise ValueError(f"not a complete {family} checkpoint: missing {', '.join(missing)}")
    for key, ndim in {**dims, "head.weight": 2}.items():
        if key in sd and (sd[key].ndim != ndim or min(sd[key].shape) < 1):
            raise ValueError(f"{key} has shape {tuple(sd[key].shape)}, a {family}'s has {ndim} non-empty axes: the "
                             f"file is damaged")


def resize_grid(patches: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int],
                **interpolation) -> torch.Tensor:
    """(1, old G1*G2, D) patch entries in raster order -> (1, new G1*G2, D), resized on their 2-D grid
    with F.interpolate(**interpolation)."""
    dim = patches.shape[-1]
    grid = patches.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), **interpolation)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patches.dtype)


def resize_head_table(table: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int],
                      **interpolation) -> torch.Tensor:
    """(1, 1 + old G1*G2, D), class entry first -> (1, 1 + new G1*G2, D): the patch part resized (see
    resize_grid), the class entry kept."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    return torch.cat((table[:, :1], resize_grid(table[:, 1:], old_grid, new_grid, **interpolation)), dim=1)


def expected_shapes(model_class: type, cfg) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape of the model `cfg` describes, from a one-block model (a model's blocks are
    alike), so a file cannot make this allocate more than its own tensors."""
    one_block = {k: tuple(v.shape) for k, v in model_class(replace(cfg, depth=1)).state_dict().items()}
    expected = {}
    for key, shape in one_block.items():
        if key.startswith("layers.0."):
            expected.update((f"layers.{i}.{key[len('layers.0.'):]}", shape) for i in range(cfg.depth))
        else:
            expected[key] = shape
    return expected


def compare_shapes(expected: Dict[str, Tuple[int, ...]], tensors: Dict[str, torch.Tensor]) -> None:
    """A ValueError listing the missing, unexpected and mis-shaped tensors, if any."""
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    misshaped = {k: f"{found[k]} (expected {expected[k]})" for k in expected.keys() & found.keys()
                 if expected[k] != found[k]}
    if missing or unexpected or misshaped:
        parts = ["the tensors do not match the inferred architecture"]
        if missing:
            parts.append(f"missing {len(missing)}: {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {listing(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {listing(misshaped, misshaped)}")
        raise ValueError("; ".join(parts))
