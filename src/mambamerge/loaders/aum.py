"""Audio Mamba checkpoints: official files are plain state dicts (checkpoint.py reads them).

Inferred from the tensors: width, depth, d_state (and the rest of the mixer), patch size, classes and
the mixer variant (conv1d_b: Bi-Bi; A_b_log alone: Fo-Bi; neither: Fo-Fo). The position table only
holds F'T' patches, so the spectrogram size comes from our metadata, from train_spec_size=(F, T), or
from AuM's 128 mel bins (then T follows); the stride is the patch size unless given. Running at
another spec_size interpolates the table bilinearly (antialiased), as the official code does.
"""
from typing import Dict, Optional, Tuple

import torch

from mambamerge.loaders.common import depth_of, mixer_config, require, resize_head_table
from mambamerge.models.aum import AuMConfig
from mambamerge.models.sizes import pair, patch_grid

FAMILY = "aum"
AUM_MEL_BINS = 128
# the tensors the architecture is read from, and their number of axes
_REQUIRED = {"patch_embed.proj.weight": 4, "pos_embed.pos_embed": 3, "cls_token": 3, "norm_f.weight": 1,
             "layers.0.mixer.in_proj.weight": 2, "layers.0.mixer.A_log": 2, "layers.0.mixer.conv1d.weight": 3,
             "layers.0.mixer.dt_proj.weight": 2}


def matches(sd: Dict[str, torch.Tensor]) -> bool:
    return "pos_embed.pos_embed" in sd


def variant_of(sd: Dict[str, torch.Tensor]) -> str:
    if "layers.0.mixer.conv1d_b.weight" in sd:
        return "Bi-Bi"
    return "Fo-Bi" if "layers.0.mixer.A_b_log" in sd else "Fo-Fo"


def interpolate_table(table: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """(1, 1 + old F'T', D), class entry first -> (1, 1 + new F'T', D), the patch part bilinear, antialiased."""
    return resize_head_table(table, old_grid, new_grid, mode="bilinear", antialias=True)


def _train_spec_size(slots: int, patch, stride, train_spec_size) -> Tuple[int, int]:
    if train_spec_size is not None:
        return train_spec_size
    freq = patch_grid((AUM_MEL_BINS, patch[1]), patch, stride)[0]
    if slots % freq:
        raise ValueError(f"the position table holds {slots} patches, which is not {freq} frequency patches (128 mel "
                         f"bins) times a number of time patches; pass train_spec_size=(F, T) and stride=")
    time_patches = slots // freq
    return AUM_MEL_BINS, (time_patches - 1) * stride[1] + patch[1]


def config_and_weights(sd: Dict[str, torch.Tensor], saved: Optional[dict] = None, spec_size=None,
                       train_spec_size=None, stride=None, **unknown):
    """(AuMConfig, state dict) to run at spec_size (F, T); default: what the checkpoint was trained at."""
    if unknown:
        raise ValueError(f"unknown option(s) for an Audio Mamba checkpoint: {', '.join(sorted(unknown))}; "
                         f"AuM takes spec_size=(F, T), train_spec_size=(F, T) and stride=")
    if any(k.startswith(("cls_token_head", "cls_token_tail", "rope.")) for k in sd):
        raise ValueError("this AuM checkpoint uses two class tokens or RoPE, which mambamerge does not implement "
                         "(the released models use one middle class token and absolute positions)")
    require(sd, _REQUIRED, "Audio Mamba")
    embed_dim, in_chans, pf, pt = sd["patch_embed.proj.weight"].shape
    if in_chans != 1:
        raise ValueError(f"the patch embedding takes {in_chans} channels; AuM spectrograms have one")
    patch = (pf, pt)
    slots = sd["pos_embed.pos_embed"].shape[1] - 1
    saved = saved or {}
    stride = pair(stride, "stride=") if stride is not None else None
    train_spec_size = pair(train_spec_size, "train_spec_size=") if train_spec_size is not None else None
    spec_size = pair(spec_size, "spec_size=") if spec_size is not None else None
    if stride is None and "stride" in saved:
        stride = pair(saved["stride"], "the stride of the file's saved config")
    if train_spec_size is None and "spec_size" in saved:
        train_spec_size = pair(saved["spec_size"], "the spec_size of the file's saved config")
    stride = stride or patch
    train_size = _train_spec_size(slots, patch, stride, train_spec_size)
    train_grid = patch_grid(train_size, patch, stride)
    if train_grid[0] * train_grid[1] != slots:
        raise ValueError(f"the position table holds {slots} patches but a {train_size[0]}x{train_size[1]} (F x T) "
                         f"spectrogram with stride {stride} gives {train_grid[0]}x{train_grid[1]}; check "
                         f"train_spec_size and stride")
    cfg = AuMConfig(embed_dim=embed_dim, depth=depth_of(sd), spec_size=spec_size or train_size,
                    patch_size=patch, stride=stride, variant=variant_of(sd),
                    num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                    **mixer_config(sd, embed_dim))
    sd = dict(sd)
    sd["pos_embed.pos_embed"] = interpolate_table(sd["pos_embed.pos_embed"], train_grid, cfg.grid_size)
    return cfg, sd
