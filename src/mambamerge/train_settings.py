"""The settings of a training run: TrainConfig (what changes the weights a run reaches) and Augment
(the training augmentation of image folders). Torch-free, so that `mambamerge train --help` is built
from them before torch is imported."""
import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    """Everything that changes the weights a run reaches (a resumed run must use the same)."""

    epochs: int = 10
    batch_size: int = 64  # per process
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_batch_size: int = 256
    distill_weight: float = 1.0  # with a teacher: loss = CE + distill_weight * T^2 * KL(teacher || student at T)
    distill_temperature: float = 1.0
    ema_decay: float = 0.0  # 0: no EMA; else validate and save an EMA of the weights (e.g. 0.999)
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    amp: str = "none"  # autocast: none, bf16, fp16 (CUDA)

    def __post_init__(self):
        """A ValueError naming the field (and its command-line flag) for a setting that cannot train."""
        rules = {"epochs": (lambda v: v >= 1, "at least 1"), "batch_size": (lambda v: v >= 1, "at least 1"),
                 "eval_batch_size": (lambda v: v >= 1, "at least 1"), "lr": (lambda v: v > 0, "above 0"),
                 "min_lr": (lambda v: 0 <= v <= self.lr, "in [0, lr]"),
                 "weight_decay": (lambda v: v >= 0, "at least 0"), "warmup_epochs": (lambda v: v >= 0, "at least 0"),
                 "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"), "grad_clip": (lambda v: v >= 0, "at least 0"),
                 "distill_weight": (lambda v: v >= 0, "at least 0"),
                 "distill_temperature": (lambda v: v > 0, "above 0"), "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
                 "mixup": (lambda v: v >= 0, "at least 0"), "cutmix": (lambda v: v >= 0, "at least 0")}
        for name, (ok, wanted) in rules.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and ok(value)):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class Augment:
    """Training augmentation of image folders; the defaults are Vim's (DeiT's) ImageNet recipe.
    auto_augment: timm's RandAugment policy string, or None for none."""

    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    re_prob: float = 0.25  # random erasing, per-pixel noise

    def transform(self, img_size: int, mean, std):
        """timm's training transform, its posterize op clamped to 1..8 bits (data.folders.posterize)."""
        from timm.data import create_transform

        from mambamerge.data.folders import clamp_posterize

        transform = create_transform(img_size, is_training=True, auto_augment=self.auto_augment,
                                     color_jitter=self.color_jitter, re_prob=self.re_prob, re_mode="pixel",
                                     interpolation="bicubic", mean=mean, std=std)
        clamp_posterize(transform)
        return transform
