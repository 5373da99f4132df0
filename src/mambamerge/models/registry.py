"""Named model configurations and `create_model`."""
from typing import Dict

from mambamerge.models.vim import VimConfig, VisionMamba

# name -> VimConfig keyword arguments
MODEL_CONFIGS: Dict[str, dict] = {
    "vim_tiny": dict(embed_dim=192, depth=24),
    "vim_small": dict(embed_dim=384, depth=24),
    "vim_base": dict(embed_dim=768, depth=24),
    "vim_tiny_plus": dict(embed_dim=192, depth=24, stride=8),
    "vim_small_plus": dict(embed_dim=384, depth=24, stride=8),
    # small configs for demos and tests: ImageNet's token geometry (14x14 patches + middle class token)
    # the demo model: grey 56x56 images, 4x4 patches, 10 classes; 12 blocks so that 80% average
    # reduction stays reachable under ToMe's 50%-per-step limit
    "vim_nano": dict(embed_dim=48, depth=12, d_state=8, img_size=56, patch_size=4, stride=4, in_chans=1,
                     num_classes=10),
    "vim_pico": dict(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8, d_state=8, num_classes=10),
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


def create_model(name: str, **overrides) -> VisionMamba:
    """Build a freshly initialised model by name; keyword arguments override its config
    (e.g. num_classes=10, img_size=56, in_chans=1, drop_path_rate=0.1)."""
    short = OFFICIAL_NAMES.get(name, name)
    if short not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    kwargs = {**MODEL_CONFIGS[short], **overrides}
    try:
        cfg = VimConfig(**kwargs)
    except TypeError as err:
        valid = ", ".join(VimConfig.__dataclass_fields__)
        raise ValueError(f"bad option for {name!r}: {err}; valid options: {valid}") from None
    return VisionMamba(cfg)
