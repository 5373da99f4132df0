"""The model families and the named configurations of each; `create_model`.

Adding a family: its module defines a MambaClassifier subclass with `family` (a short name) and
`config_class` (its config dataclass) and registers its CheckpointAdapter (models/adapter.py); import
the module here and list its named configs in MODEL_CONFIGS.
"""
from typing import Dict, Tuple

from mambamerge.models import aum, videomamba, vim  # noqa: F401  (each registers its adapter)
from mambamerge.models.adapter import ADAPTERS
from mambamerge.models.base import MambaClassifier

FAMILIES: Dict[str, type] = {family: adapter.model_class for family, adapter in ADAPTERS.items()}

# name -> (family, config keyword arguments)
MODEL_CONFIGS: Dict[str, Tuple[str, dict]] = {
    "vim_tiny": ("vim", dict(embed_dim=192, depth=24)),
    "vim_small": ("vim", dict(embed_dim=384, depth=24)),
    "vim_base": ("vim", dict(embed_dim=768, depth=24)),
    "vim_tiny_plus": ("vim", dict(embed_dim=192, depth=24, stride=8)),
    "vim_small_plus": ("vim", dict(embed_dim=384, depth=24, stride=8)),
    # small configs for demos and tests: ImageNet's token geometry (14x14 patches + middle class token)
    # the demo model: grey 56x56 images, 4x4 patches, 10 classes; 12 blocks so that 80% average
    # reduction stays reachable under ToMe's 50%-per-step limit
    "vim_nano": ("vim", dict(embed_dim=48, depth=12, d_state=8, img_size=56, patch_size=4, stride=4, in_chans=1,
                             num_classes=10)),
    "vim_pico": ("vim", dict(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8, d_state=8, num_classes=10)),
    # VideoMamba (official video_sm configs: 224x224, patch 16, tubelet 1, 8 frames; 1000 classes as the
    # official constructor, Kinetics-400 files have 400 and load with it)
    "videomamba_tiny": ("videomamba", dict(embed_dim=192, depth=24)),
    "videomamba_small": ("videomamba", dict(embed_dim=384, depth=24)),
    "videomamba_middle": ("videomamba", dict(embed_dim=576, depth=32)),
    # Audio Mamba (128 mel bins x 1024 frames, 16x16 patches, AudioSet's 527 classes; variant Bi-Bi)
    "aum_tiny": ("aum", dict(embed_dim=192, depth=24)),
    "aum_small": ("aum", dict(embed_dim=384, depth=24)),
    "aum_base": ("aum", dict(embed_dim=768, depth=24)),
    # the audio and video demo models, small enough to train in minutes on a CPU: 64 patch tokens + the
    # class token, 12 blocks so that 80% average reduction stays reachable
    # audio: 128 mel bins x 128 frames (1.28 s: FSDD's spoken digits), 16x16 patches -> 8 x 8
    "aum_nano": ("aum", dict(embed_dim=32, depth=12, d_state=8, spec_size=(128, 128), num_classes=10)),
    # video: 8 grey 32x32 frames (moving Fashion-MNIST), 8x8 patches, tubelets of 2 frames -> 4 x 4 x 4
    "videomamba_nano": ("videomamba", dict(embed_dim=32, depth=12, d_state=8, num_frames=8, tubelet=2, img_size=32,
                                           patch_size=8, in_chans=1, num_classes=40)),
}

# refinements of a named model's pretrained_cfg (MambaClassifier.default_pretrained_cfg): the demo model
# takes Fashion-MNIST as mambamerge's IDX loader gives it (28x28 resized bilinearly, no crop, its
# training pixels' mean / std)
PRETRAINED_CFGS: Dict[str, dict] = {
    "vim_nano": dict(interpolation="bilinear", crop_pct=1.0, mean=(0.2860,), std=(0.3530,)),
}

# the official entry-point names of hustvl/Vim, registered with timm as aliases
OFFICIAL_NAMES: Dict[str, str] = {
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny",
    "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_plus",
    "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small",
    "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_plus",
    "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base",
}


def list_models() -> list:
    """Names accepted by create_model (short names, then the official long names)."""
    return sorted(MODEL_CONFIGS) + sorted(OFFICIAL_NAMES)


def build(family: str, **config) -> MambaClassifier:
    """A freshly initialised model of `family` from its config's keyword arguments; a bad option is a
    ValueError listing the valid ones."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(sorted(FAMILIES))}")
    cls = FAMILIES[family]
    try:
        cfg = cls.config_class(**config)
    except TypeError as err:
        valid = ", ".join(cls.config_class.__dataclass_fields__)
        raise ValueError(f"bad option for a {family} model: {err}; valid options: {valid}") from None
    return cls(cfg)


def _named(name: str) -> Tuple[str, str, dict]:
    """(short name, family, config keyword arguments) of a model name."""
    short = OFFICIAL_NAMES.get(name, name)
    if short not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return (short, *MODEL_CONFIGS[short])


def pretrained_cfg_of(name: str) -> dict:
    """timm's pretrained_cfg of a named model with its default config, without building it."""
    short, family, config = _named(name)
    cls = FAMILIES[family]
    return {**cls.default_pretrained_cfg(cls.config_class(**config)), **PRETRAINED_CFGS.get(short, {})}


def create_model(name: str, **overrides) -> MambaClassifier:
    """Build a freshly initialised model by name; keyword arguments override its config
    (e.g. num_classes=10, img_size=56, in_chans=1, drop_path_rate=0.1)."""
    short, family, config = _named(name)
    try:
        model = build(family, **{**config, **overrides})
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from None
    if "in_chans" not in overrides:  # the refinements describe the named model's input channels
        model.pretrained_cfg = {**model.pretrained_cfg, **PRETRAINED_CFGS.get(short, {})}
    return model
