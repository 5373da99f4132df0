"""What a training run saves in last.pt and reads back to resume: the TrainState (model, optimiser,
EMA, loss scaler and the Progress counters) saved and restored in one place, and the one check that a
saved state belongs to the run that resumes it."""
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mambamerge.atomic import atomic_write
from mambamerge.distributed import barrier, world
from mambamerge.train_settings import TrainConfig
from mambamerge.train_step import param_groups

_RESUME_KEYS = ("model", "optimizer", "state", "config", "run")


@dataclass
class Progress:
    """Where a run stands: plain values only (saved as last.pt's "state")."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimiser steps done
    best: float = -1.0  # best validation top-1 so far, at epoch best_epoch
    best_epoch: int = 0
    seen: int = 0  # images and summed loss of this process in the epoch under way
    loss_sum: float = 0.0
    history: list = field(default_factory=list)  # one entry per epoch done (history.json)
    test_accuracy: Optional[float] = None
    extensions: list = field(default_factory=list)  # each resume that added epochs


@dataclass
class TrainState:
    """Everything a resumed run needs to continue bit for bit."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Optional[AveragedModel]
    config: TrainConfig
    run: dict
    progress: Progress = field(default_factory=Progress)

    @classmethod
    def create(cls, model: torch.nn.Module, cfg: TrainConfig, run: dict) -> "TrainState":
        """A fresh state: AdamW over param_groups, a loss scaler (active with fp16), an EMA if cfg asks."""
        device = next(model.parameters()).device
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) \
            if cfg.ema_decay else None
        return cls(model, opt, scaler, ema, cfg, run)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights validated and saved: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def save(self, path: Path) -> None:
        """Write last.pt atomically (first process only; every process waits for it)."""
        if world().is_main:
            payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else {},
                       "state": asdict(self.progress), "config": asdict(self.config), "run": self.run}
            atomic_write(path, lambda tmp: torch.save(payload, tmp))
        barrier()

    def restore(self, saved: dict) -> None:
        """Load a state load_resume returned (and so checked) into this one."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.progress = Progress(**saved["state"])


def run_record(run: Optional[dict], train_set, val_set, teacher: bool) -> dict:
    """What identifies a run beyond its TrainConfig, as saved in last.pt and compared on resume: the
    caller's `run` (data spec, model, method, ...) plus the data's sizes and classes, whether a
    teacher is used and the number of processes."""
    return {**(run or {}), "train_images": len(train_set), "val_images": len(val_set),
            "classes": list(train_set.info.classes), "processes": world().size, "distilled": teacher}


def _differences(saved: dict, now: dict) -> str:
    keys = sorted(set(saved) | set(now), key=str)
    return "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k))


def load_resume(path, cfg: TrainConfig, run: dict) -> dict:
    """The training state saved in `path` (a last.pt), checked against `cfg` and the `run` record it
    must belong to (run_record): a ValueError naming every difference when it is missing, unreadable,
    not a mambamerge training state or from another run. cfg may have more epochs than the saved run
    (an extension, see mambamerge.train), never fewer. Read with weights_only=True: a file holding
    anything but tensors and plain values is refused, never run. The file is only read."""
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
    before, now = dict(saved["config"]), asdict(cfg)
    if {**before, "epochs": None} != {**now, "epochs": None}:
        raise ValueError(f"{path} was written with other settings ({_differences(before, now)}); "
                         f"resume with the same settings or start a new output folder")
    if now["epochs"] < before["epochs"]:
        raise ValueError(f"{path} is a run of {before['epochs']} epochs: --resume continues it, or extends it with "
                         f"more --epochs, but cannot shorten it (model.safetensors and history.json hold the epochs "
                         f"done so far); resume with --epochs {before['epochs']} or more")
    if saved["run"] != run:
        raise ValueError(f"{path} belongs to another run ({_differences(saved['run'], run)}); resume it with the "
                         f"same data, model and method, or start a new output folder")
    return saved
