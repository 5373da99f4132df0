"""Seeded, resumable CPU-friendly training (from scratch or fine-tuning with token reduction active).

Every epoch ends with an evaluation and an atomic save of `last.pt` (model, optimiser, step, epoch,
random state) from which `resume=True` continues exactly; the best weights so far go to
`model.safetensors` (mambamerge.save_checkpoint format). `last.pt` holds only tensors and plain
values and is read back with torch.load(weights_only=True): a planted file cannot run code.
"""
import json
import math
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mambamerge.atomic import atomic_write, write_bytes
from mambamerge.checkpoint import save_checkpoint
from mambamerge.data import batches, unreadable
from mambamerge.evaluate import accuracy

NO_DECAY = ("pos_embed", "cls_token", "A_log", "A_b_log", "D", "D_b")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_batch_size: int = 256

    def __post_init__(self):
        """A ValueError naming the field (and its command-line flag) for a setting that cannot train."""
        rules = {"epochs": (lambda v: v >= 1, "at least 1"), "batch_size": (lambda v: v >= 1, "at least 1"),
                 "eval_batch_size": (lambda v: v >= 1, "at least 1"), "lr": (lambda v: v > 0, "above 0"),
                 "min_lr": (lambda v: 0 <= v <= self.lr, "in [0, lr]"),
                 "weight_decay": (lambda v: v >= 0, "at least 0"), "warmup_epochs": (lambda v: v >= 0, "at least 0"),
                 "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"), "grad_clip": (lambda v: v >= 0, "at least 0")}
        for name, (ok, wanted) in rules.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and ok(value)):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {wanted}, got {value!r}")


def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: no decay for norms, biases, position/class embeddings and the SSM's A_log and D."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if p.ndim <= 1 or leaf in NO_DECAY or name in NO_DECAY else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


_RESUME_KEYS = ("model", "optimizer", "generator", "torch_rng", "state", "config")


def load_resume(path, cfg: TrainConfig) -> dict:
    """The training state saved in `path` (a last.pt), checked against `cfg`: a ValueError when it is
    missing, unreadable, not a mambamerge training state or written with other settings. Read with
    weights_only=True: a file holding anything but tensors and plain values is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot resume: {path} does not exist (no epoch was saved there); give the output "
                         f"folder of the interrupted run, or leave out --resume to start a new one")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"cannot resume from {path}: it holds Python objects a training state never has "
                         f"({(str(err).strip().splitlines() or ['?'])[0]}); it was not written by mambamerge and "
                         f"is refused unread: delete it or use a new output folder") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"cannot resume from {path}: the file is truncated or corrupt "
                         f"({(str(err).strip().splitlines() or [type(err).__name__])[0]}); delete it to start "
                         f"again, or use a new output folder") from None
    if not isinstance(saved, dict) or not all(k in saved for k in _RESUME_KEYS):
        raise ValueError(f"cannot resume from {path}: not a mambamerge training state (expected the entries "
                         f"{', '.join(_RESUME_KEYS)}); delete it or use a new output folder")
    if saved["config"] != asdict(cfg):
        raise ValueError(f"{path} was written with other settings ({saved['config']}); resume with the same "
                         f"settings or start a new output folder")
    return saved


def train(model, train_set, val_set, out_dir, cfg: TrainConfig = TrainConfig(), resume: Union[bool, dict] = False,
          log=print) -> dict:
    """Train `model` in place, on the device its parameters are on; returns {"best_accuracy", "epochs",
    "history"}. resume: True to continue from out_dir/last.pt (which must exist), or the state
    load_resume already read from it."""
    for name, data in (("training", train_set), ("validation", val_set)):
        if len(data) == 0:
            raise ValueError(f"the {name} set is empty: nothing to train on or evaluate")
    device = next(model.parameters()).device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    state = {"epoch": 0, "step": 0, "best": -1.0, "history": []}
    last = out_dir / "last.pt"
    if resume:
        saved = resume if isinstance(resume, dict) else load_resume(last, cfg)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        log(f"resumed from {last} after epoch {state['epoch']}")
    for epoch in range(state["epoch"], cfg.epochs):
        model.train()
        seen, loss_sum = 0, 0.0
        bar = tqdm(batches(train_set, cfg.batch_size, shuffle=True, generator=gen), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(state["step"], total, warmup, cfg)
            loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            state["step"] += 1
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        acc = accuracy(model, val_set, cfg.eval_batch_size)
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_accuracy": acc})
        if acc > state["best"]:
            state["best"] = acc
            save_checkpoint(model, out_dir / "model.safetensors")
        snapshot = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "state": state, "config": asdict(cfg)}
        atomic_write(last, lambda tmp: torch.save(snapshot, tmp))
        write_bytes(out_dir / "history.json", json.dumps(state["history"], indent=1))
        skipped = len(unreadable(train_set)) + len(unreadable(val_set))
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {loss_sum / max(seen, 1):.4f}, val top-1 {acc:.2%}"
            + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    return {"best_accuracy": state["best"], "epochs": state["epoch"], "history": state["history"]}
