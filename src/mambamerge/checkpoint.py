"""Reading and writing model checkpoints.

Accepted files: an official Vim or VideoMamba `.pth` (a torch.save dict with the weights under "model"
or "model_ema" and an argparse Namespace under "args"), a plain state dict saved with torch.save (as
the official Audio Mamba files are), or a `.safetensors` file (ours carry the family and the model
config in their metadata). The family and the architecture are inferred from the tensors themselves
(Vim here, the other families in mambamerge.loaders).
"""
import argparse
import json
import math
import os
import pickle
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mambamerge.atomic import atomic_write, file_kind
from mambamerge.loaders import FAMILY_NAMES, LOADERS, detect_family
from mambamerge.loaders.common import depth_of
from mambamerge.merge.recipe import MergeRecipe
from mambamerge.models.base import MambaClassifier
from mambamerge.models.registry import FAMILIES
from mambamerge.models.sizes import pair, patch_grid
from mambamerge.models.vim import VimConfig, VisionMamba, interpolate_pos_embed

PathLike = Union[str, os.PathLike]
CONFIG_METADATA_KEY = "mambamerge_config"
CLASSES_METADATA_KEY = "mambamerge_classes"
FAMILY_METADATA_KEY = "mambamerge_family"
MERGE_METADATA_KEY = "mambamerge_merge"
_MAX_LISTED = 8
MAX_PIXELS = 16384  # the largest image side or stride a file may record


class CheckpointError(ValueError):
    """A checkpoint file that cannot be turned into a model; the message says why and what to do."""


@dataclass
class RawCheckpoint:
    """Tensors of a checkpoint plus what the file says about how they were trained."""

    state_dict: Dict[str, torch.Tensor]
    train_img_size: Optional[Tuple[int, int]] = None
    stride: Optional[Tuple[int, int]] = None
    classes: Optional[List[str]] = None
    family: Optional[str] = None  # from our metadata (files without it are recognised by their keys)
    config: Optional[dict] = None  # our saved config of a family other than Vim
    merge: Optional[MergeRecipe] = None  # the token reduction it was saved running (fine-tuned with)


def _listing(keys, shapes=None) -> str:
    keys = sorted(keys)
    shown = [f"{k} {shapes[k]}" if shapes else k for k in keys[:_MAX_LISTED]]
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(shown) + more


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _pair(value, what: str, user: bool = False) -> Tuple[int, int]:
    """An image size or stride a file records (or, user=True, one the caller passes) as a pair, at most
    MAX_PIXELS."""
    try:
        return pair(value, what, MAX_PIXELS, unit=" of pixels")
    except ValueError as err:
        raise CheckpointError(f"{err}{'' if user else '; the file is damaged or was not written by mambamerge'}") \
            from None


def _metadata_json(text: str, what: str):
    """A metadata entry parsed as JSON; a CheckpointError naming `what` when it is not JSON, nests too
    deeply for the parser or holds an integer too long to convert."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        why = str(err)
    except RecursionError:
        why = "it is nested too deeply"
    except ValueError:  # Python's limit on the digits of an integer
        why = "it holds an integer with too many digits"
    raise CheckpointError(f"{what} is not JSON mambamerge can read ({why}); the file is damaged: re-save it")


def _read_safetensors(path: Path) -> RawCheckpoint:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file, it is truncated or corrupt ({err}); "
                              f"re-download or re-save it") from None
    raw = RawCheckpoint(state, family=metadata.get(FAMILY_METADATA_KEY))
    if CONFIG_METADATA_KEY in metadata:
        what = f"{path}: the {CONFIG_METADATA_KEY} metadata"
        cfg = _metadata_json(metadata[CONFIG_METADATA_KEY], what)
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{what} is a JSON {type(cfg).__name__}, not an object; the file is damaged: "
                                  f"re-save it")
        if raw.family not in (None, "vim"):
            raw.config = cfg
        else:
            if "img_size" in cfg:
                raw.train_img_size = _pair(cfg["img_size"], f"{what}'s img_size")
            if "stride" in cfg:
                raw.stride = _pair(cfg["stride"], f"{what}'s stride")
    if CLASSES_METADATA_KEY in metadata:
        classes = _metadata_json(metadata[CLASSES_METADATA_KEY], f"{path}: the {CLASSES_METADATA_KEY} metadata")
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise CheckpointError(f"{path}: the {CLASSES_METADATA_KEY} metadata is not a JSON list of class names; "
                                  f"the file is damaged: re-save it")
        raw.classes = classes
    if MERGE_METADATA_KEY in metadata:
        try:
            raw.merge = MergeRecipe.from_json(metadata[MERGE_METADATA_KEY])
        except ValueError as err:
            raise CheckpointError(f"{path}: the {MERGE_METADATA_KEY} metadata (the token reduction it was fine-tuned "
                                  f"with) {err}; the file is damaged or from another version: re-save it") from None
    return raw


_CONVERT = ("if you trust the file, convert it once in Python: mambamerge.save_checkpoint(mambamerge.load_checkpoint("
            "path, trust_pickle=True), 'model.safetensors'), then use the .safetensors file")


def _sniff(path: Path, head: bytes) -> Optional[str]:
    """Why a file that is neither safetensors nor a torch.save file cannot be a checkpoint, or None."""
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save zip archive, or its legacy pickle
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a checkpoint: neither safetensors nor a torch.save file (it starts with bytes {head[:8].hex()})"
    kind = "a JSON file" if text.lstrip()[:1] in ("{", "[") else "a text file"
    return f"not a checkpoint: {kind} (it starts with {text[:24]!r}), not safetensors or a torch.save file"


def _torch_load(path: Path, trust_pickle: bool):
    try:
        if trust_pickle:
            warnings.warn(f"loading {path} with weights_only=False: this runs arbitrary pickled code; "
                          f"only do it for files you trust", stacklevel=3)
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise CheckpointError(f"{path}: cannot be read by torch.load, the file is truncated or corrupt "
                                  f"({_first_line(err)}); re-download or re-save it") from None
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: the file holds pickled Python objects{what} besides tensors; mambamerge does "
                              f"not unpickle them, since unpickling can run any code; {_CONVERT}") from None
    except Exception as err:  # weights_only: nothing ran; whatever failed is a damaged file
        raise CheckpointError(f"{path}: cannot be read by torch.load, the file is truncated or corrupt "
                              f"({_first_line(err)}); re-download or re-save it") from None


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
    if args.get("input_size") is not None:
        raw.train_img_size = _pair(args["input_size"], f"{path}: args.input_size")
    match = re.search(r"stride(\d+)", str(args.get("model", "")))
    if match:
        raw.stride = _pair(int(match.group(1)), f"{path}: the stride in args.model {args['model']!r}")
    return raw


def read_checkpoint(path: PathLike, ema: bool = False, trust_pickle: bool = False) -> RawCheckpoint:
    """Read the tensors of a checkpoint file without building a model."""
    path = Path(path)
    head = _head(path)
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        raw = _read_safetensors(path)
    else:
        problem = _sniff(path, head)
        if problem:
            raise CheckpointError(f"{path}: {problem}; give a .pth or .safetensors checkpoint")
        raw = _pick_state_dict(_torch_load(path, trust_pickle), path, ema)
    _check_values(raw.state_dict, path)
    return raw


def _head(path: Path) -> bytes:
    """The first 64 bytes of a checkpoint file; a FileNotFoundError when there is none, a CheckpointError
    when it is a folder, a FIFO, a device (through a link or not) or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror}); give a readable .pth or .safetensors "
                              f"file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            link = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
            raise CheckpointError(f"{path}{link} is {file_kind(mode)}, not a checkpoint file; give a .pth or "
                                  f".safetensors file")
        return os.read(fd, 64)
    finally:
        os.close(fd)


def _check_values(state: Dict[str, torch.Tensor], path: Path) -> None:
    """A CheckpointError naming the tensors that are not floating point (quantised or damaged weights:
    every tensor of these models is float) or hold NaN or infinite values."""
    integer = {k: str(v.dtype).replace("torch.", "") for k, v in state.items() if not v.is_floating_point()}
    if integer:
        raise CheckpointError(f"{path}: tensors that are not floating point: {_listing(integer, integer)}; the "
                              f"models' weights are float (float32, float16 or bfloat16): the file is quantised or "
                              f"damaged, use its float original")
    broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path}: tensors with NaN or infinite values: {_listing(broken)}; the weights are "
                              f"damaged or their training diverged: use another checkpoint")


# the tensors the architecture is read from, with the dimensions a Vim gives them
_REQUIRED = {"patch_embed.proj.weight": ("embed_dim", "channels", "patch_h", "patch_w"),
             "pos_embed": ("1", "tokens", "embed_dim"), "cls_token": ("1", "1", "embed_dim"),
             "norm_f.weight": ("embed_dim",), "layers.0.mixer.in_proj.weight": ("2 x d_inner", "embed_dim"),
             "layers.0.mixer.A_log": ("d_inner", "d_state"), "layers.0.mixer.conv1d.weight": ("d_inner", "1", "d_conv"),
             "layers.0.mixer.dt_proj.weight": ("d_inner", "dt_rank")}
_OPTIONAL = {"head.weight": ("classes", "embed_dim")}
_FALLBACK_SIZE = 224
_CLI_CANNOT = ("the command line cannot set these: convert the file once in Python, mambamerge.save_checkpoint "
               "records them")


def _check_layout(sd: Dict[str, torch.Tensor]) -> int:
    """Check the tensors the architecture is read from and the block numbering; returns the depth.
    Done before anything is built, so a file cannot ask for more than its own tensors describe."""
    for key, dims in {**_REQUIRED, **_OPTIONAL}.items():
        if key in sd and (sd[key].ndim != len(dims) or min(sd[key].shape) < 1):
            raise CheckpointError(f"{key} has shape {tuple(sd[key].shape)}, a Vim's is ({', '.join(dims)}): the "
                                  f"file is damaged or not a Vim checkpoint")
    try:
        return depth_of(sd)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _infer_stride(num_slots: int, patch: Tuple[int, int], raw: RawCheckpoint, img_size: Optional[Tuple[int, int]],
                  stride, train_img_size) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Returns (stride, training grid) from the position-embedding length and what is known."""
    stride = _pair(stride, "stride=", user=True) if stride is not None else raw.stride
    train = _pair(train_img_size, "train_img_size=", user=True) if train_img_size is not None else raw.train_img_size
    num_patches = num_slots - 1
    if train is not None and stride is not None:
        grid = patch_grid(train, patch, stride)
    else:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise CheckpointError(f"pos_embed holds {num_patches} patches, not a square grid; pass "
                                  f"train_img_size=(H, W) and stride= to load_checkpoint ({_CLI_CANNOT})")
        grid = (side, side)
        if stride is None:
            ref = train or img_size or (_FALLBACK_SIZE, _FALLBACK_SIZE)
            if side == 1:
                stride = patch
            else:
                steps = [(r - p) / (side - 1) for r, p in zip(ref, patch)]
                if not all(s >= 1 and s == int(s) for s in steps):
                    fix = ("train_img_size= (the resolution the checkpoint was trained at) or stride= to "
                           f"load_checkpoint ({_CLI_CANNOT})" if img_size and not train
                           else "the resolution it was trained at (img_size=, on the command line --img-size)")
                    raise CheckpointError(
                        f"cannot infer the patch stride: a {side}x{side} patch grid with {patch[0]}x{patch[1]} "
                        f"patches does not fit a {ref[0]}x{ref[1]} image; pass {fix}")
                stride = tuple(int(s) for s in steps)
                if not (train or img_size) and any(s > p for s, p in zip(stride, patch)):
                    raise CheckpointError(
                        f"the file does not record the resolution it was trained at, and at the default "
                        f"{ref[0]}x{ref[1]} its {side}x{side} grid of {patch[0]}x{patch[1]} patches would need a "
                        f"stride of {stride[0]}, which skips pixels between patches; pass the resolution it was "
                        f"trained at (img_size=, on the command line --img-size)")
    if grid[0] * grid[1] != num_patches:
        raise CheckpointError(f"pos_embed holds {num_patches} patches but train size {train} with stride {stride} "
                              f"gives a {grid[0]}x{grid[1]} grid; check train_img_size and stride")
    return stride, grid


def infer_config(raw: RawCheckpoint, img_size=None, stride=None, train_img_size=None) -> Tuple[VimConfig, tuple]:
    """Architecture of the checkpoint's tensors, built for `img_size` (default: the training resolution
    the file records or train_img_size, else 224). Returns (config, training grid)."""
    sd = raw.state_dict
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise CheckpointError(f"not a Vision Mamba (Vim) checkpoint: missing {_listing(missing)}; "
                              f"the file has keys like {_listing(sd)}")
    depth = _check_layout(sd)
    embed_dim, in_chans, ph, pw = sd["patch_embed.proj.weight"].shape
    d_inner = sd["layers.0.mixer.in_proj.weight"].shape[0] // 2
    if d_inner == 0 or d_inner % embed_dim:
        raise CheckpointError(f"in_proj has {2 * d_inner} outputs, not a multiple of 2 x embed_dim={embed_dim}")
    size = _pair(img_size, "img_size=", user=True) if img_size is not None else None
    stride, grid = _infer_stride(sd["pos_embed"].shape[1], (ph, pw), raw, size, stride, train_img_size)
    if size is None:
        size = (_pair(train_img_size, "train_img_size=", user=True) if train_img_size is not None
                else raw.train_img_size or (_FALLBACK_SIZE, _FALLBACK_SIZE))
    try:
        cfg = VimConfig(
            embed_dim=embed_dim, depth=depth, img_size=size, patch_size=(ph, pw), stride=stride,
            in_chans=in_chans, num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
            d_state=sd["layers.0.mixer.A_log"].shape[1], d_conv=sd["layers.0.mixer.conv1d.weight"].shape[-1],
            expand=d_inner // embed_dim, dt_rank=sd["layers.0.mixer.dt_proj.weight"].shape[1])
    except ValueError as err:
        raise CheckpointError(f"the tensors describe no buildable Vim: {err}") from None
    return cfg, grid


def check_tensors(raw: RawCheckpoint, cfg: VimConfig, grid: Tuple[int, int], path: PathLike) -> None:
    """Every tensor of the file against the shapes of the model `cfg` describes, before that model is
    built (see _expected_shapes). pos_embed is compared at the training grid."""
    expected = _expected_shapes(VisionMamba, cfg)
    expected["pos_embed"] = (1, grid[0] * grid[1] + 1, cfg.embed_dim)
    _compare_shapes(expected, raw.state_dict, path)


def _expected_shapes(family_class, cfg) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape of the model `cfg` describes, from a one-block model (a model's blocks are
    alike), so a file cannot make this allocate more than its own tensors."""
    one_block = {k: tuple(v.shape) for k, v in family_class(replace(cfg, depth=1)).state_dict().items()}
    expected = {}
    for key, shape in one_block.items():
        if key.startswith("layers.0."):
            expected.update((f"layers.{i}.{key[len('layers.0.'):]}", shape) for i in range(cfg.depth))
        else:
            expected[key] = shape
    return expected


def _compare_shapes(expected: Dict[str, Tuple[int, ...]], tensors: Dict[str, torch.Tensor], path: PathLike) -> None:
    """A CheckpointError listing the missing, unexpected and mis-shaped tensors, if any."""
    found = {k: tuple(v.shape) for k, v in tensors.items()}
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


def _family_of(raw: RawCheckpoint, path: Path, expected: Optional[str]) -> str:
    """The checkpoint's family; a CheckpointError when it is not the `expected` one."""
    found = raw.family or detect_family(raw.state_dict)
    if expected is not None and expected != found:
        if expected not in FAMILIES:
            raise ValueError(f"unknown model family {expected!r}; known families: {', '.join(sorted(FAMILIES))}")
        raise CheckpointError(f"{path}: this is a {FAMILY_NAMES.get(found, found)} checkpoint, but family={expected!r} "
                              f"({FAMILY_NAMES[expected]}) was asked for; pick a {FAMILY_NAMES[expected]} file, or "
                              f"load this one with family={found!r}")
    return found


def load_checkpoint(path: PathLike, img_size=None, *, stride=None, train_img_size=None, ema: bool = False,
                    trust_pickle: bool = False, family: Optional[str] = None, **options) -> MambaClassifier:
    """Build the model a checkpoint file describes and load its weights (strict), in eval mode.

    The family (Vim, VideoMamba, Audio Mamba) is recognised from the tensors; family= ("vim",
    "videomamba", "aum") makes a file of another family an error. Options of the other families:
    VideoMamba img_size= (frame size) and num_frames= (both interpolate the position tables);
    Audio Mamba spec_size=(F, T) to run at (interpolates), train_spec_size=(F, T) and stride= when the
    file cannot tell them (official files: 128 mel bins, stride = patch size).

    img_size: resolution to run at (int or (H, W)); the position embedding is interpolated when the
        checkpoint was trained at another one. Default: the resolution the file records (our
        safetensors, official files' args.input_size, or train_img_size), else 224 (when the
        tensors fit it with a stride no larger than the patch; else an error asks for it).
    stride, train_img_size: only needed when the file cannot tell (a plain state dict of a stride-8
        model run at a new size).
    ema: take the "model_ema" weights of an official training checkpoint instead of "model".
    trust_pickle: allow arbitrary pickled objects (weights_only=False); never for untrusted files.

    model.classes: the class names the file records (our safetensors written by `mambamerge train`),
    else None. model.merge_recipe: the token reduction a fine-tuned file was trained with (a
    MergeRecipe: method, options, per-block schedule), else None; the model comes back dense:
    `mambamerge.patch(model, model.merge_recipe)` applies it. Every tensor is checked against the
    inferred architecture before the model is built.
    """
    path = Path(path)
    raw = read_checkpoint(path, ema=ema, trust_pickle=trust_pickle)
    found = _family_of(raw, path, family)
    if found != "vim":
        return _load_other_family(raw, path, found, img_size=img_size, stride=stride, **options)
    if options:
        raise TypeError(f"unknown option(s) for a Vim checkpoint: {', '.join(sorted(options))}; Vim takes img_size=, "
                        f"stride= and train_img_size=")
    cfg, grid = infer_config(raw, img_size=img_size, stride=stride, train_img_size=train_img_size)
    check_tensors(raw, cfg, grid, path)
    model = VisionMamba(cfg)
    sd = dict(raw.state_dict)
    sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], grid, cfg.grid_size)
    model.load_state_dict(sd, strict=True)
    return _described(model, raw, path)


def _described(model: MambaClassifier, raw: RawCheckpoint, path: PathLike) -> MambaClassifier:
    """The freshly built `model` in eval mode, with the class names and merge recipe the file records."""
    if raw.merge is not None and len(raw.merge.removals) != len(model.layers):
        raise CheckpointError(f"{path}: the {MERGE_METADATA_KEY} metadata has a schedule for {len(raw.merge.removals)} "
                              f"blocks but the model has {len(model.layers)}; the file is damaged: re-save it")
    model.classes, model.merge_recipe = raw.classes, raw.merge
    return model.eval()


def family_config(raw: RawCheckpoint, path: PathLike, family: str, **options):
    """(config, adapted state dict) of a VideoMamba or Audio Mamba checkpoint: its loader
    (mambamerge.loaders) infers the config and adapts the position tables; every tensor is then
    checked against the config before any model is built."""
    if family not in LOADERS:
        raise CheckpointError(f"{path}: written for a model family this version does not know ({family!r}); "
                              f"known families: {', '.join(sorted(FAMILIES))}")
    options = {k: v for k, v in options.items() if v is not None}
    try:
        cfg, sd = LOADERS[family].config_and_weights(raw.state_dict, raw.config, **options)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    _compare_shapes(_expected_shapes(FAMILIES[family], cfg), sd, path)
    return cfg, sd


def _load_other_family(raw: RawCheckpoint, path: Path, family: str, **options) -> MambaClassifier:
    cfg, sd = family_config(raw, path, family, **options)
    model = FAMILIES[family](cfg)
    model.load_state_dict(sd, strict=True)
    return _described(model, raw, path)


def save_checkpoint(model: MambaClassifier, path: PathLike, classes: Optional[Sequence[str]] = None) -> Path:
    """Write the weights as safetensors, with the family, the config, the class names (`classes`,
    else the model's own `classes` attribute when it has one) and, for a patched model, the token
    reduction it runs (method, options, per-block schedule: load_checkpoint gives it back as
    `model.merge_recipe`) in the metadata; atomic (no half-written file). A dense model records none,
    even one loaded with a recipe: patch it with `patch(model, model.merge_recipe)` to keep it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(model.cfg.to_dict()), FAMILY_METADATA_KEY: model.family}
    classes = classes if classes is not None else getattr(model, "classes", None)
    if classes is not None:
        if len(classes) != model.num_classes:
            raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} classes")
        metadata[CLASSES_METADATA_KEY] = json.dumps(list(classes))
    recipe = MergeRecipe.of(model)
    if recipe is not None:
        metadata[MERGE_METADATA_KEY] = recipe.to_json()
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
