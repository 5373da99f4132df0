"""Seeded, resumable training: from scratch, or fine-tuning with token reduction active, optionally
distilled from a teacher, with an EMA of the weights, mixed precision and several processes.

Reproducible by construction: each step's batch, augmentation and dropout come from seeds derived
from (seed, epoch, step, process) (mambamerge.data.loading), never from a running random stream. So
`last.pt` (model, optimiser, EMA, loss scaler, step, history, saved atomically at every epoch end
and every `save_every` steps) is all a resumed run needs to reach bit for bit the weights of an
uninterrupted one, after a kill at any moment. `last.pt` holds only tensors and plain values and is
read back with torch.load(weights_only=True): a planted file cannot run code.

Model selection uses `val_set` (hold it out of the training data: data.loading.holdout_split; a
warning says when it is too small to choose on); the best epoch's weights go to `model.safetensors`,
the last epoch's to `model_last.safetensors`, and `test_set`, if given, is evaluated once on the
selected weights and only reported.

Extending a run: resuming with more epochs than the saved run (everything else the same) trains on
from where it stopped; every step from there on takes the learning rate a run started with the new
number of epochs takes at that step (lr_at with the new total: the warm-up is unchanged and the
cosine reaches min_lr at the new last step), while the steps already taken keep the rates they had.
So a finished 2-epoch run extended to 3 jumps from min_lr back to lr_at(2 E, 3 E) (E steps an epoch),
as timm's schedulers do when resumed with more epochs. The extension is saved like any run: a kill
during it resumes bit for bit. history.json records each epoch's last learning rate, summary.json
each extension.

Under torchrun every process runs `train` with the same arguments: the model is wrapped in
DistributedDataParallel, each process takes its share of every epoch, evaluation counts each image
once, and only the first process writes files.
"""
import copy
import json
import math
import pickle
import random
import time
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Subset

from mambamerge.atomic import atomic_write, write_bytes
from mambamerge.checkpoint import save_checkpoint
from mambamerge.data import unreadable
from mambamerge.data.loading import derive_seed, epoch_batches, train_batches
from mambamerge.devices import autocast, check_amp
from mambamerge.distributed import barrier, sum_all, union_all, world
from mambamerge.evaluate import accuracy
from mambamerge.progress import progress
from mambamerge.train_settings import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: no decay for 1-D parameters (norms, biases) and those of model.no_weight_decay()
    (position and class embeddings, the SSM's A_log and D), as timm's optimiser factory groups them."""
    spared = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in spared else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress_)))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.
    student, teacher: logits (B, num_classes)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


_RESUME_KEYS = ("model", "optimizer", "state", "config", "run")


def _differences(saved: dict, now: dict) -> str:
    keys = sorted(set(saved) | set(now), key=str)
    return "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k))


def load_resume(path, cfg: TrainConfig, run: Optional[dict] = None) -> dict:
    """The training state saved in `path` (a last.pt), checked against `cfg` and, when given, the `run`
    it must belong to (data, model, method, ... as train() records them): a ValueError naming every
    difference when it is missing, unreadable, not a mambamerge training state or from another run.
    cfg may have more epochs than the saved run (an extension, see train()), never fewer.
    Read with weights_only=True: a file holding anything but tensors and plain values is refused,
    never run. The file is only read."""
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
    if run is not None:
        _check_run(saved, run, path)
    return saved


def _check_run(saved: dict, run: dict, path: Path) -> None:
    if saved["run"] != run:
        raise ValueError(f"{path} belongs to another run ({_differences(saved['run'], run)}); resume it with the "
                         f"same data, model and method, or start a new output folder")


def run_record(run: Optional[dict], train_set, val_set, teacher: bool) -> dict:
    """What identifies a run beyond its TrainConfig, as saved in last.pt and compared on resume: the
    caller's `run` (data spec, model, method, ...) plus the data's sizes and classes, whether a
    teacher is used and the number of processes."""
    return {**(run or {}), "train_images": len(train_set), "val_images": len(val_set),
            "classes": list(train_set.info.classes), "processes": world().size, "distilled": teacher}


def train(model, train_set, val_set, out_dir, cfg: TrainConfig = TrainConfig(), resume: Union[bool, dict] = False,
          log=print, *, teacher: Optional[torch.nn.Module] = None, test_set=None, run: Optional[dict] = None,
          workers: int = 0, save_every: int = 0, test_name: str = "test") -> dict:
    """Train `model` in place, on the device its parameters are on.

    train_set / val_set / test_set: datasets with .info (see module docstring for their roles).
    resume: True to continue from out_dir/last.pt (which must exist), or the state load_resume
        already read from it; with more cfg.epochs than it was saved with, the run is extended (see
        the module docstring).
    teacher: a model whose logits the student is distilled towards (cfg.distill_weight, _temperature);
        kept in eval mode and not trained.
    run: what identifies the run beyond cfg (data spec, model, method, ...), saved and checked on
        resume together with the data's sizes and classes and the number of processes.
    workers: DataLoader processes for folder data (no effect on the result); save_every: also save
        last.pt every that many steps (0: at epoch ends only); test_name: what the log calls test_set.
    Returns {"best_accuracy", "best_epoch", "epochs", "history", "test_accuracy" (None without a test set),
    "test_name", "extensions"}.
    """
    here = world()
    for name, data in (("training", train_set), ("validation", val_set)):
        if len(data) == 0:
            raise ValueError(f"the {name} set is empty: nothing to train on or evaluate")
    device = next(model.parameters()).device
    check_amp(cfg.amp, device)
    out_dir = Path(out_dir)
    run = run_record(run, train_set, val_set, teacher is not None)
    steps_per_epoch = len(epoch_batches(len(train_set), cfg.batch_size, cfg.seed, 0, here.rank, here.size))
    last = out_dir / "last.pt"
    saved = load_resume(last, cfg, run) if resume is True else resume or None
    if saved is not None:
        _check_run(saved, run, last)
    if here.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) \
        if cfg.ema_decay else None
    mix = _mixer(cfg, train_set.info.num_classes)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    state = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": 0, "seen": 0, "loss_sum": 0.0, "history": [],
             "test_accuracy": None}
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state = saved["state"]
        log(f"resumed from {last} at step {state['step']} (epoch {state['epoch'] + 1}, "
            f"{state['step'] - state['epoch'] * steps_per_epoch} of {steps_per_epoch} steps done)")
        if saved["config"]["epochs"] < cfg.epochs:
            state["extensions"] = [*state.get("extensions", []), {"step": state["step"], "epochs_before":
                                                                  saved["config"]["epochs"], "epochs": cfg.epochs}]
            state["test_accuracy"] = None  # the selected epoch may change: tested again at the new end
            log(f"extending the run from {saved['config']['epochs']} to {cfg.epochs} epochs: from step "
                f"{state['step']} on, the learning rate follows the {cfg.epochs}-epoch schedule "
                f"({lr_at(state['step'], total, warmup, cfg):.3g} now, cosine to {cfg.min_lr:g} at step {total})")
    if here.is_main:
        _check_selection(val_set)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if here.active else model
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    def snapshot():
        if here.is_main:
            payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                       "ema": ema.state_dict() if ema is not None else {}, "state": state, "config": asdict(cfg),
                       "run": run}
            atomic_write(last, lambda tmp: torch.save(payload, tmp))
        barrier()

    evaluated = ema.module if ema is not None else model
    classes = list(train_set.info.classes)
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        batches = epoch_batches(len(train_set), cfg.batch_size, cfg.seed, epoch, here.rank, here.size)
        start = state["step"] - epoch * steps_per_epoch
        model.train()
        began = time.perf_counter()
        bar = progress(train_batches(train_set, batches, cfg.seed, epoch, start, workers, device.type == "cuda"),
                       total=steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            _seed_step(derive_seed(cfg.seed, "step", state["step"], here.rank))
            # mixup / cutmix pair the images of a batch: an odd-sized last batch stays unmixed
            images, targets = mix(images, labels) if mix is not None and len(labels) % 2 == 0 else (images, labels)
            for group in opt.param_groups:
                group["lr"] = lr_at(state["step"], total, warmup, cfg)
            with autocast(device, cfg.amp):
                logits = net(images)
            loss = _classification_loss(logits.float(), targets, cfg.label_smoothing)
            if teacher is not None:
                with torch.no_grad(), autocast(device, cfg.amp):
                    target_logits = teacher(images)
                loss = loss + cfg.distill_weight * distillation_loss(logits, target_logits, cfg.distill_temperature)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            state["step"] += 1
            state["seen"] += len(labels)
            state["loss_sum"] += loss.item() * len(labels)
            bar.set_postfix(loss=f"{state['loss_sum'] / state['seen']:.3f}")
            if save_every and state["step"] % save_every == 0 and state["step"] % steps_per_epoch:
                snapshot()
        bar.close()
        seconds, seen_now = time.perf_counter() - began, sum(len(b) for b in batches[start:])
        seen, loss_sum = sum_all([state["seen"], state["loss_sum"]], device)
        if getattr(train_set, "unreadable", None) is not None:
            union_all(train_set.unreadable)  # each process met the unreadable images of its own share
        acc = accuracy(evaluated, val_set, cfg.eval_batch_size, amp=cfg.amp, workers=workers)
        state.update(epoch=epoch + 1, seen=0, loss_sum=0.0)
        state["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_accuracy": acc,
                                 "lr": opt.param_groups[0]["lr"], "seconds": seconds,
                                 "train_images_per_s": seen_now * here.size / seconds})
        improved = acc > state["best"]
        if improved:
            state.update(best=acc, best_epoch=epoch + 1)
        if here.is_main:
            if improved:
                save_checkpoint(evaluated, out_dir / "model.safetensors", classes=classes)
            save_checkpoint(evaluated, out_dir / "model_last.safetensors", classes=classes)
            write_bytes(out_dir / "history.json", json.dumps(state["history"], indent=1))
        snapshot()
        entry = state["history"][-1]
        skipped = len(unreadable(train_set)) + len(unreadable(val_set))
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {entry['train_loss']:.4f}, val top-1 {acc:.2%} "
            f"({len(val_set)} held-out images), {seconds:.0f} s ({entry['train_images_per_s']:.1f} images/s)"
            + (f" ({skipped} unreadable images skipped)" if skipped else ""))
    if test_set is not None and state["test_accuracy"] is None:
        selected = copy.deepcopy(evaluated)
        selected.load_state_dict(load_file(str(out_dir / "model.safetensors")))
        state["test_accuracy"] = accuracy(selected, test_set, cfg.eval_batch_size, amp=cfg.amp, workers=workers)
        log(f"{test_name} top-1 {state['test_accuracy']:.2%} ({len(test_set)} images) of the "
            f"epoch-{state['best_epoch']} weights selected on the validation split (reported only, never used to "
            f"select)")
        snapshot()
    result = {"best_accuracy": state["best"], "best_epoch": state["best_epoch"], "epochs": state["epoch"],
              "history": state["history"], "test_accuracy": state["test_accuracy"], "test_name": test_name,
              "extensions": state.get("extensions", []),
              "unreadable_images": sorted({name for part in (train_set, val_set, test_set) if part is not None
                                           for name in unreadable(part)})}
    if here.is_main:
        write_bytes(out_dir / "summary.json", json.dumps(result, indent=1))
    return result


# below either, choosing the best epoch on the held-out images is mostly choosing on noise
SELECTION_FLOOR = {"images": 100, "per_class": 5}


def _check_selection(val_set) -> None:
    """Warn when the validation set is too small to select the best epoch on (SELECTION_FLOOR)."""
    labels = _labels(val_set)
    rarest = min(torch.bincount(labels, minlength=val_set.info.num_classes).tolist()) if labels is not None else None
    if len(val_set) < SELECTION_FLOOR["images"] or (rarest is not None and rarest < SELECTION_FLOOR["per_class"]):
        rare = f", {rarest} of the rarest class" if rarest is not None else ""
        warnings.warn(f"the best epoch is selected on {len(val_set)} held-out images{rare}: below "
                      f"{SELECTION_FLOOR['images']} images or {SELECTION_FLOOR['per_class']} per class that choice "
                      f"is mostly noise; hold out more with --val-split, or judge by model_last.safetensors")


def _labels(dataset) -> Optional[torch.Tensor]:
    """The class index of every input, when the dataset knows them without decoding (None if not)."""
    if isinstance(dataset, Subset):
        labels = _labels(dataset.dataset)
        return labels[list(dataset.indices)] if labels is not None else None
    folder = getattr(dataset, "folder", None)  # an image folder: torchvision's ImageFolder targets
    labels = getattr(dataset, "labels", None) if folder is None else getattr(folder, "targets", None)
    return torch.as_tensor(labels, dtype=torch.long) if labels is not None else None


def _seed_step(seed: int) -> None:
    """Seed every generator a step may draw from (dropout, drop path, mixup) from the step's own seed."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against class indices (B,) with label smoothing, or against soft targets (B, K)
    that mixup already smoothed."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def _mixer(cfg: TrainConfig, num_classes: int):
    """timm's Mixup / CutMix (switching between them per batch when both are on), or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)
