"""Reading and writing model checkpoints.

Accepted files: an official Vim `.pth` (a torch.save dict with the weights under "model" or
"model_ema" and an argparse Namespace under "args"), a plain state dict saved with torch.save, or a
`.safetensors` file (ours carry the model config in their metadata). The architecture is inferred
from the tensors themselves.
"""
import argparse
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mambamerge.atomic import atomic_write
from mambamerge.models.vim import VimConfig, VisionMamba, interpolate_pos_embed, to_2tuple

PathLike = Union[str, os.PathLike]
CONFIG_METADATA_KEY = "mambamerge_config"
CLASSES_METADATA_KEY = "mambamerge_classes"
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint file that cannot be turned into a model; the message says why and what to do."""


@dataclass
class RawCheckpoint:
    """Tensors of a checkpoint plus what the file says about how they were trained."""

    state_dict: Dict[str, torch.Tensor]
    train_img_size: Optional[Tuple[int, int]] = None
    stride: Optional[Tuple[int, int]] = None
    classes: Optional[List[str]] = None


def _listing(keys, shapes=None) -> str:
    keys = sorted(keys)
    shown = [f"{k} {shapes[k]}" if shapes else k for k in keys[:_MAX_LISTED]]
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(shown) + more


def _read_safetensors(path: Path) -> RawCheckpoint:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file, it is truncated or corrupt ({err}); "
                              f"re-download or re-save it") from None
    raw = RawCheckpoint(state)
    if CONFIG_METADATA_KEY in metadata:
        cfg = json.loads(metadata[CONFIG_METADATA_KEY])
        raw.train_img_size = to_2tuple(cfg["img_size"])
        raw.stride = to_2tuple(cfg["stride"])
    if CLASSES_METADATA_KEY in metadata:
        raw.classes = list(json.loads(metadata[CLASSES_METADATA_KEY]))
    return raw


def _torch_load(path: Path, trust_pickle: bool):
    try:
        if trust_pickle:
            warnings.warn(f"loading {path} with weights_only=False: this runs arbitrary pickled code; "
                          f"only do it for files you trust", stacklevel=3)
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: the file holds Python objects beyond tensors and an argparse Namespace "
                              f"({str(err).splitlines()[0]}); if you trust the file, pass trust_pickle=True") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read by torch.load, the file is truncated or corrupt "
                              f"({str(err).splitlines()[0]}); re-download or re-save it") from None


def _pick_state_dict(obj, path: Path, ema: bool) -> RawCheckpoint:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    key = "model_ema" if ema else None
    if ema and "model_ema" not in obj:
        raise CheckpointError(f"{path}: ema=True but the file has no 'model_ema' entry "
                              f"(top-level keys: {_listing(obj)})")
    if key is None:
        key = next((k for k in ("model", "state_dict", "model_ema") if isinstance(obj.get(k), dict)), None)
    state = obj[key] if key else obj
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {_listing(obj)})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    raw = RawCheckpoint(tensors)
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    if isinstance(args.get("input_size"), int):
        raw.train_img_size = to_2tuple(args["input_size"])
    match = re.search(r"stride(\d+)", str(args.get("model", "")))
    if match:
        raw.stride = to_2tuple(int(match.group(1)))
    return raw


def read_checkpoint(path: PathLike, ema: bool = False, trust_pickle: bool = False) -> RawCheckpoint:
    """Read the tensors of a checkpoint file without building a model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        return _read_safetensors(path)
    return _pick_state_dict(_torch_load(path, trust_pickle), path, ema)


_REQUIRED = ("patch_embed.proj.weight", "pos_embed", "cls_token", "norm_f.weight",
             "layers.0.mixer.in_proj.weight", "layers.0.mixer.A_log", "layers.0.mixer.conv1d.weight",
             "layers.0.mixer.dt_proj.weight")


def _infer_stride(num_slots: int, patch: Tuple[int, int], raw: RawCheckpoint, img_size: Tuple[int, int],
                  stride, train_img_size) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Returns (stride, training grid) from the position-embedding length and what is known."""
    stride = to_2tuple(stride) if stride is not None else raw.stride
    train = to_2tuple(train_img_size) if train_img_size is not None else raw.train_img_size
    num_patches = num_slots - 1
    if train is not None and stride is not None:
        grid = tuple((t - p) // s + 1 for t, p, s in zip(train, patch, stride))
    else:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise CheckpointError(f"pos_embed holds {num_patches} patches, not a square grid; pass "
                                  f"train_img_size=(H, W) and stride= to load it")
        grid = (side, side)
        if stride is None:
            ref = train if train is not None else img_size
            if side == 1:
                stride = patch
            else:
                steps = [(r - p) / (side - 1) for r, p in zip(ref, patch)]
                if not all(s >= 1 and s == int(s) for s in steps):
                    raise CheckpointError(
                        f"cannot infer the patch stride: a {side}x{side} patch grid with {patch[0]}x{patch[1]} "
                        f"patches does not fit a {ref[0]}x{ref[1]} image; pass train_img_size= (the resolution "
                        f"the checkpoint was trained at) or stride=")
                stride = tuple(int(s) for s in steps)
    if grid[0] * grid[1] != num_patches:
        raise CheckpointError(f"pos_embed holds {num_patches} patches but train size {train} with stride {stride} "
                              f"gives a {grid[0]}x{grid[1]} grid; check train_img_size and stride")
    return stride, grid


def infer_config(raw: RawCheckpoint, img_size=224, stride=None, train_img_size=None) -> Tuple[VimConfig, tuple]:
    """Architecture of the checkpoint's tensors, built for `img_size`. Returns (config, training grid)."""
    sd = raw.state_dict
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise CheckpointError(f"not a Vision Mamba (Vim) checkpoint: missing {_listing(missing)}; "
                              f"the file has keys like {_listing(sd)}")
    embed_dim, in_chans, ph, pw = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    d_inner = sd["layers.0.mixer.in_proj.weight"].shape[0] // 2
    if d_inner % embed_dim:
        raise CheckpointError(f"in_proj has {2 * d_inner} outputs, not a multiple of 2 x embed_dim={embed_dim}")
    stride, grid = _infer_stride(sd["pos_embed"].shape[1], (ph, pw), raw, to_2tuple(img_size), stride,
                                 train_img_size)
    cfg = VimConfig(
        embed_dim=embed_dim, depth=depth, img_size=img_size, patch_size=(ph, pw), stride=stride,
        in_chans=in_chans, num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        d_state=sd["layers.0.mixer.A_log"].shape[1], d_conv=sd["layers.0.mixer.conv1d.weight"].shape[-1],
        expand=d_inner // embed_dim, dt_rank=sd["layers.0.mixer.dt_proj.weight"].shape[1])
    return cfg, grid


def _check_keys(model: torch.nn.Module, sd: Dict[str, torch.Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    misshaped = {k: f"{found[k]} (expected {expected[k]})" for k in expected.keys() & found.keys()
                 if expected[k] != found[k]}
    if missing or unexpected or misshaped:
        parts = [f"{path}: the tensors do not match the inferred architecture"]
        if missing:
            parts.append(f"missing {len(missing)}: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {_listing(misshaped, misshaped)}")
        raise CheckpointError("; ".join(parts))


def load_checkpoint(path: PathLike, img_size=None, *, stride=None, train_img_size=None, ema: bool = False,
                    trust_pickle: bool = False) -> VisionMamba:
    """Build the model a checkpoint file describes and load its weights (strict), in eval mode.

    img_size: resolution to run at (int or (H, W)); the position embedding is interpolated when the
        checkpoint was trained at another one. Default: the resolution the file records (our
        safetensors, official files' args.input_size, or train_img_size), else 224.
    stride, train_img_size: only needed when the file cannot tell (a plain state dict of a stride-8
        model run at a new size).
    ema: take the "model_ema" weights of an official training checkpoint instead of "model".
    trust_pickle: allow arbitrary pickled objects (weights_only=False); never for untrusted files.
    """
    path = Path(path)
    raw = read_checkpoint(path, ema=ema, trust_pickle=trust_pickle)
    if img_size is None:
        img_size = train_img_size or raw.train_img_size or 224
    cfg, grid = infer_config(raw, img_size=img_size, stride=stride, train_img_size=train_img_size)
    model = VisionMamba(cfg)
    sd = dict(raw.state_dict)
    sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], grid, cfg.grid_size)
    _check_keys(model, sd, path)
    model.load_state_dict(sd, strict=True)
    model.classes = raw.classes
    return model.eval()


def save_checkpoint(model: VisionMamba, path: PathLike, classes: Optional[Sequence[str]] = None) -> Path:
    """Write the weights as safetensors, with the config and the class names (`classes`, else the
    model's own `classes` attribute when it has one) in the metadata; atomic (no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(model.cfg.to_dict())}
    classes = classes if classes is not None else getattr(model, "classes", None)
    if classes is not None:
        if len(classes) != model.cfg.num_classes:
            raise ValueError(f"{len(classes)} class names for a model with {model.cfg.num_classes} classes")
        metadata[CLASSES_METADATA_KEY] = json.dumps(list(classes))
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
