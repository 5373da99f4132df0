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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from mambamerge.atomic import write_bytes
from mambamerge.checkpoint import save_checkpoint
from mambamerge.data import unreadable
from mambamerge.data.loading import derive_seed, epoch_batches, train_batches
from mambamerge.devices import autocast, check_amp
from mambamerge.distributed import sum_all, union_all, world
from mambamerge.evaluate import accuracy
from mambamerge.progress import progress
from mambamerge.train_settings import TrainConfig
from mambamerge.train_state import TrainState, load_resume, run_record
from mambamerge.train_step import Objective, distillation_loss, lr_at, make_mixer, param_groups, seed_step

__all__ = ["TrainConfig", "distillation_loss", "load_resume", "lr_at", "param_groups", "run_record", "train"]


@dataclass
class _Run:
    """What every epoch of one train() call shares."""

    state: TrainState
    net: torch.nn.Module  # what the steps call: the model, wrapped in DistributedDataParallel under torchrun
    objective: Objective
    mixer: Optional[Callable]
    train_set: object
    val_set: object
    out_dir: Path
    device: torch.device
    steps_per_epoch: int
    workers: int
    save_every: int
    log: Callable

    @property
    def last(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def schedule(self) -> tuple:
        """(total steps, warm-up steps) of the cosine schedule."""
        cfg = self.state.config
        return cfg.epochs * self.steps_per_epoch, int(cfg.warmup_epochs * self.steps_per_epoch)


def train(model, train_set, val_set, out_dir, cfg: TrainConfig = TrainConfig(), resume: Union[bool, dict] = False,
          log=print, *, teacher: Optional[torch.nn.Module] = None, test_set=None, run: Optional[dict] = None,
          workers: int = 0, save_every: int = 0, test_name: str = "test") -> dict:
    """Train `model` in place, on the device its parameters are on.

    train_set / val_set / test_set: datasets with .info (see module docstring for their roles).
    resume: True to continue from out_dir/last.pt (which must exist), or the state load_resume
        already read and checked from it; with more cfg.epochs than it was saved with, the run is
        extended (see the module docstring).
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
    record = run_record(run, train_set, val_set, teacher is not None)
    saved = load_resume(out_dir / "last.pt", cfg, record) if resume is True else resume or None
    if here.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    state = TrainState.create(model, cfg, record)
    steps_per_epoch = len(epoch_batches(len(train_set), cfg.batch_size, cfg.seed, 0, here.rank, here.size))
    loop = _Run(state, model, Objective(cfg, teacher, device), make_mixer(cfg, train_set.info.num_classes), train_set,
                val_set, out_dir, device, steps_per_epoch, workers, save_every, log)
    if saved is not None:
        _resume(loop, saved)
    if here.is_main:
        _check_selection(val_set)
    if here.active:
        loop.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    while state.progress.epoch < cfg.epochs:
        _end_epoch(loop, *_train_epoch(loop))
    if test_set is not None and state.progress.test_accuracy is None:
        _final_test(loop, test_set, test_name)
    done = state.progress
    result = {"best_accuracy": done.best, "best_epoch": done.best_epoch, "epochs": done.epoch,
              "history": done.history, "test_accuracy": done.test_accuracy, "test_name": test_name,
              "extensions": done.extensions,
              "unreadable_images": sorted({name for part in (train_set, val_set, test_set) if part is not None
                                           for name in unreadable(part)})}
    if here.is_main:
        write_bytes(out_dir / "summary.json", json.dumps(result, indent=1))
    return result


def _resume(loop: _Run, saved: dict) -> None:
    """Restore `saved` into the run; an extension (more epochs than saved) is recorded and logged."""
    state, cfg = loop.state, loop.state.config
    state.restore(saved)
    done = state.progress
    loop.log(f"resumed from {loop.last} at step {done.step} (epoch {done.epoch + 1}, "
             f"{done.step - done.epoch * loop.steps_per_epoch} of {loop.steps_per_epoch} steps done)")
    before = saved["config"]["epochs"]
    if before < cfg.epochs:
        done.extensions = [*done.extensions, {"step": done.step, "epochs_before": before, "epochs": cfg.epochs}]
        done.test_accuracy = None  # the selected epoch may change: tested again at the new end
        total, warmup = loop.schedule
        loop.log(f"extending the run from {before} to {cfg.epochs} epochs: from step {done.step} on, the learning "
                 f"rate follows the {cfg.epochs}-epoch schedule ({lr_at(done.step, total, warmup, cfg):.3g} now, "
                 f"cosine to {cfg.min_lr:g} at step {total})")


def _train_epoch(loop: _Run) -> tuple:
    """Run the rest of the current epoch (from the step the state is at); save last.pt every
    save_every steps. Returns (seconds, images this process trained on)."""
    state, cfg, here, device = loop.state, loop.state.config, world(), loop.device
    done, opt = state.progress, state.optimizer
    total, warmup = loop.schedule
    epoch = done.epoch
    batches = epoch_batches(len(loop.train_set), cfg.batch_size, cfg.seed, epoch, here.rank, here.size)
    start = done.step - epoch * loop.steps_per_epoch
    state.model.train()
    began = time.perf_counter()
    bar = progress(train_batches(loop.train_set, batches, cfg.seed, epoch, start, loop.workers, device.type == "cuda"),
                   total=loop.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        seed_step(derive_seed(cfg.seed, "step", done.step, here.rank))
        # mixup / cutmix pair the images of a batch: an odd-sized last batch stays unmixed
        mixed = loop.mixer is not None and len(labels) % 2 == 0
        images, targets = loop.mixer(images, labels) if mixed else (images, labels)
        for group in opt.param_groups:
            group["lr"] = lr_at(done.step, total, warmup, cfg)
        with autocast(device, cfg.amp):
            logits = loop.net(images)
        loss = loop.objective(logits, images, targets)
        opt.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if cfg.grad_clip:
            state.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
        state.scaler.step(opt)
        state.scaler.update()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        done.step += 1
        done.seen += len(labels)
        done.loss_sum += loss.item() * len(labels)
        bar.set_postfix(loss=f"{done.loss_sum / done.seen:.3f}")
        if loop.save_every and done.step % loop.save_every == 0 and done.step % loop.steps_per_epoch:
            state.save(loop.last)
    bar.close()
    return time.perf_counter() - began, sum(len(b) for b in batches[start:])


def _end_epoch(loop: _Run, seconds: float, seen_now: int) -> None:
    """Validate, record the epoch in the history, save the best and the last weights and last.pt, log."""
    state, cfg, here = loop.state, loop.state.config, world()
    done, evaluated = state.progress, state.evaluated
    epoch = done.epoch
    seen, loss_sum = sum_all([done.seen, done.loss_sum], loop.device)
    if getattr(loop.train_set, "unreadable", None) is not None:
        union_all(loop.train_set.unreadable)  # each process met the unreadable images of its own share
    acc = accuracy(evaluated, loop.val_set, cfg.eval_batch_size, amp=cfg.amp, workers=loop.workers)
    done.epoch, done.seen, done.loss_sum = epoch + 1, 0, 0.0
    done.history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_accuracy": acc,
                         "lr": state.optimizer.param_groups[0]["lr"], "seconds": seconds,
                         "train_images_per_s": seen_now * here.size / seconds})
    improved = acc > done.best
    if improved:
        done.best, done.best_epoch = acc, epoch + 1
    if here.is_main:
        classes = list(loop.train_set.info.classes)
        if improved:
            save_checkpoint(evaluated, loop.out_dir / "model.safetensors", classes=classes)
        save_checkpoint(evaluated, loop.out_dir / "model_last.safetensors", classes=classes)
        write_bytes(loop.out_dir / "history.json", json.dumps(done.history, indent=1))
    state.save(loop.last)
    entry = done.history[-1]
    skipped = len(unreadable(loop.train_set)) + len(unreadable(loop.val_set))
    loop.log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {entry['train_loss']:.4f}, val top-1 {acc:.2%} "
             f"({len(loop.val_set)} held-out images), {seconds:.0f} s ({entry['train_images_per_s']:.1f} images/s)"
             + (f" ({skipped} unreadable images skipped)" if skipped else ""))


def _final_test(loop: _Run, test_set, test_name: str) -> None:
    """Evaluate the weights selected on validation (model.safetensors) once on test_set; reported only."""
    state, cfg, done = loop.state, loop.state.config, loop.state.progress
    selected = copy.deepcopy(state.evaluated)
    selected.load_state_dict(load_file(str(loop.out_dir / "model.safetensors")))
    done.test_accuracy = accuracy(selected, test_set, cfg.eval_batch_size, amp=cfg.amp, workers=loop.workers)
    loop.log(f"{test_name} top-1 {done.test_accuracy:.2%} ({len(test_set)} images) of the epoch-{done.best_epoch} "
             f"weights selected on the validation split (reported only, never used to select)")
    state.save(loop.last)


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
