"""One training step's pieces: the optimiser's parameter groups, the learning-rate schedule, the
step's seeding, mixup / cutmix and the loss (with its teacher, when distilling)."""
import math
import random
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mambamerge.devices import autocast
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


def seed_step(seed: int) -> None:
    """Seed every generator a step may draw from (dropout, drop path, mixup) from the step's own seed."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def make_mixer(cfg: TrainConfig, num_classes: int):
    """timm's Mixup / CutMix (switching between them per batch when both are on), or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.
    student, teacher: logits (B, num_classes)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against class indices (B,) with label smoothing, or against soft targets (B, K)
    that mixup already smoothed."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class Objective:
    """The training loss: cross-entropy, plus cfg.distill_weight x the distillation loss towards
    `teacher`'s logits when one is given (kept in eval mode, not trained)."""

    def __init__(self, cfg: TrainConfig, teacher: Optional[torch.nn.Module], device: torch.device):
        self.cfg, self.teacher, self.device = cfg, teacher, device
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def __call__(self, logits: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits (B, K) of `images`; targets (B,) class indices or (B, K) mixed ones -> scalar loss."""
        loss = classification_loss(logits.float(), targets, self.cfg.label_smoothing)
        if self.teacher is None:
            return loss
        with torch.no_grad(), autocast(self.device, self.cfg.amp):
            target_logits = self.teacher(images)
        return loss + self.cfg.distill_weight * distillation_loss(logits, target_logits, self.cfg.distill_temperature)
