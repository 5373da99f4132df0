"""Reading and writing model checkpoints.

Accepted files: an official Vim or VideoMamba `.pth` (a torch.save dict with the weights under "model"
or "model_ema" and an argparse Namespace under "args"), a plain state dict saved with torch.save (as
the official Audio Mamba files are), or a `.safetensors` file (ours carry the family and the model
config in their metadata). The family and the architecture are inferred from the tensors themselves,
by the family's CheckpointAdapter (registered next to its model in mambamerge.models).
"""
import argparse
import json
import os
import pickle
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mambamerge.atomic import atomic_write, file_kind
from mambamerge.merge.recipe import MergeRecipe
from mambamerge.models import registry  # noqa: F401  (registers every family's adapter)
from mambamerge.models.adapter import ADAPTERS, CheckpointAdapter, adapter_for, family_title, listing
from mambamerge.models.base import MambaClassifier

PathLike = Union[str, os.PathLike]
CONFIG_METADATA_KEY = "mambamerge_config"
CLASSES_METADATA_KEY = "mambamerge_classes"
FAMILY_METADATA_KEY = "mambamerge_family"
MERGE_METADATA_KEY = "mambamerge_merge"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be turned into a model; the message says why and what to do."""


@dataclass
class RawCheckpoint:
    """Tensors of a checkpoint plus what the file says about how they were trained."""

    state_dict: Dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)  # our saved config (safetensors metadata), read by the adapter
    args: dict = field(default_factory=dict)  # an official training checkpoint's args, read by the adapter
    classes: Optional[List[str]] = None
    family: Optional[str] = None  # from our metadata (files without it are recognised by their keys)
    merge: Optional[MergeRecipe] = None  # the token reduction it was saved running (fine-tuned with)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


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
        raw.config = cfg
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
                              f"(top-level keys: {listing(obj)})")
    if key is None:
        key = next((k for k in ("model", "state_dict", "model_ema") if isinstance(obj.get(k), dict)), None)
    state = obj[key] if key else obj
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {listing(obj)})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    return RawCheckpoint(tensors, args=args)


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
        raise CheckpointError(f"{path}: tensors that are not floating point: {listing(integer, integer)}; the "
                              f"models' weights are float (float32, float16 or bfloat16): the file is quantised or "
                              f"damaged, use its float original")
    broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path}: tensors with NaN or infinite values: {listing(broken)}; the weights are "
                              f"damaged or their training diverged: use another checkpoint")


def _adapter_of(raw: RawCheckpoint, path: PathLike, expected: Optional[str]) -> CheckpointAdapter:
    """The adapter of the checkpoint's family (the one its metadata names, else the one that recognises
    its keys); a CheckpointError when it is not the `expected` family."""
    if raw.family is not None and raw.family not in ADAPTERS:
        raise CheckpointError(f"{path}: written for a model family this version does not know ({raw.family!r}); "
                              f"known families: {', '.join(sorted(ADAPTERS))}")
    adapter = ADAPTERS[raw.family] if raw.family is not None else adapter_for(raw.state_dict)
    if expected is not None and expected != adapter.family:
        if expected not in ADAPTERS:
            raise ValueError(f"unknown model family {expected!r}; known families: {', '.join(sorted(ADAPTERS))}")
        want = family_title(expected)
        raise CheckpointError(f"{path}: this is a {adapter.title} checkpoint, but family={expected!r} ({want}) was "
                              f"asked for; pick a {want} file, or load this one with family={adapter.family!r}")
    return adapter


class Inferred(NamedTuple):
    """What a checkpoint's tensors describe: its family's adapter, the config to build, the token grid
    its position tables were trained at, and its tensors adapted to the config."""

    adapter: CheckpointAdapter
    config: object
    trained_grid: Tuple[int, ...]
    state_dict: Dict[str, torch.Tensor]


def infer_architecture(raw: RawCheckpoint, path: PathLike, family: Optional[str] = None, **options) -> Inferred:
    """The architecture of a checkpoint read by read_checkpoint, built for `options` (see
    load_checkpoint; None values are left out), every tensor checked against it."""
    adapter = _adapter_of(raw, path, family)
    try:
        cfg, grid, state = adapter.weights(raw, **{k: v for k, v in options.items() if v is not None})
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return Inferred(adapter, cfg, grid, state)


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
    inferred = infer_architecture(raw, path, family, img_size=img_size, stride=stride, train_img_size=train_img_size,
                                  **options)
    model = inferred.adapter.model_class(inferred.config)
    model.load_state_dict(inferred.state_dict, strict=True)
    if raw.merge is not None and len(raw.merge.removals) != len(model.layers):
        raise CheckpointError(f"{path}: the {MERGE_METADATA_KEY} metadata has a schedule for {len(raw.merge.removals)} "
                              f"blocks but the model has {len(model.layers)}; the file is damaged: re-save it")
    model.classes, model.merge_recipe = raw.classes, raw.merge
    return model.eval()


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
