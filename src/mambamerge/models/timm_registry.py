"""Registers every model with timm, under its short name and the official long name, so
`timm.create_model("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")`
works once mambamerge is imported. There are no downloadable weights: load files with
`mambamerge.load_checkpoint`."""
from timm.models import register_model

from mambamerge.models.registry import MODEL_CONFIGS, OFFICIAL_NAMES, create_model

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(name: str):
    def build(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name}: pretrained weights cannot be downloaded; build with pretrained=False and "
                             f"use mambamerge.load_checkpoint(path) on a local checkpoint file")
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        return create_model(name, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"mambamerge {name} (no pretrained weights)"
    return build


for _name in list(MODEL_CONFIGS) + list(OFFICIAL_NAMES):
    register_model(_entrypoint(_name))
