"""The model families and the named configurations of each; `create_model`.

Adding a family: its module defines a MambaClassifier subclass (its config, `family`, `input_kind`,
`named_configs`, ...) and registers its CheckpointAdapter (models/adapter.py); import the module here.
"""
from typing import Dict, Tuple

from mambamerge.models import aum, videomamba, vim  # noqa: F401  (each registers its adapter)
from mambamerge.models.adapter import ADAPTERS
from mambamerge.models.base import MambaClassifier

FAMILIES: Dict[str, type] = {family: adapter.model_class for family, adapter in ADAPTERS.items()}

# name -> (family, config keyword arguments), from every family's named_configs
MODEL_CONFIGS: Dict[str, Tuple[str, dict]] = {name: (family, config) for family, cls in FAMILIES.items()
                                              for name, config in cls.named_configs.items()}
# refinements of a named model's pretrained_cfg (MambaClassifier.default_pretrained_cfg)
PRETRAINED_CFGS: Dict[str, dict] = {name: refined for cls in FAMILIES.values()
                                    for name, refined in cls.named_pretrained_cfgs.items()}
# other names of the named models (the official entry points), registered with timm as aliases
OFFICIAL_NAMES: Dict[str, str] = {alias: name for cls in FAMILIES.values() for alias, name in cls.aliases.items()}


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
