"""VideoMamba checkpoints: official files hold the weights under "model" (checkpoint.py unpacks them).

Inferred from the tensors: width, depth, d_state (and the rest of the mixer), patch size, tubelet,
frames (temporal table x tubelet), frame size (square spatial table x patch, unless our metadata
says otherwise) and classes. Running at another frame size or clip length interpolates the spatial
table bicubically (the class entry kept) and the temporal one linearly, as the official fine-tuning does.
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from mambamerge.loaders.common import depth_of, mixer_config, require, resize_head_table
from mambamerge.models.sizes import pair, whole
from mambamerge.models.videomamba import VideoMambaConfig

FAMILY = "videomamba"
MAX_FRAMES = 4096
MAX_PIXELS = 16384  # the largest frame side an option or a file may give
# the tensors the architecture is read from, and their number of axes
_REQUIRED = {"patch_embed.proj.weight": 5, "pos_embed": 3, "temporal_pos_embedding": 3, "cls_token": 3,
             "norm_f.weight": 1, "layers.0.mixer.in_proj.weight": 2, "layers.0.mixer.A_log": 2,
             "layers.0.mixer.conv1d.weight": 3, "layers.0.mixer.dt_proj.weight": 2,
             "layers.0.mixer.conv1d_b.weight": 3}


def matches(sd: Dict[str, torch.Tensor]) -> bool:
    return "temporal_pos_embedding" in sd


def interpolate_spatial(pos_embed: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """(1, 1 + old H'W', D), class entry first -> (1, 1 + new H'W', D); the patch part resized bicubically."""
    return resize_head_table(pos_embed, old_grid, new_grid, mode="bicubic", align_corners=False)


def interpolate_temporal(table: torch.Tensor, frames: int) -> torch.Tensor:
    """(1, T', D) -> (1, frames, D), linearly."""
    if table.shape[1] == frames:
        return table
    out = F.interpolate(table.permute(0, 2, 1).float(), size=frames, mode="linear", align_corners=False)
    return out.permute(0, 2, 1).to(table.dtype)


def config_and_weights(sd: Dict[str, torch.Tensor], saved: Optional[dict] = None, img_size=None,
                       num_frames: Optional[int] = None, **unknown):
    """(VideoMambaConfig, state dict) to run at img_size (int or (H, W)) and num_frames; both default to
    what the checkpoint was trained at."""
    if unknown:
        raise ValueError(f"unknown option(s) for a VideoMamba checkpoint: {', '.join(sorted(unknown))}; "
                         f"VideoMamba takes img_size= and num_frames=")
    require(sd, _REQUIRED, "VideoMamba")
    embed_dim, in_chans, tubelet, ph, pw = sd["patch_embed.proj.weight"].shape
    slots = sd["pos_embed"].shape[1] - 1
    img_size = pair(img_size, "img_size=", MAX_PIXELS) if img_size is not None else None
    num_frames = whole(num_frames, "num_frames=", MAX_FRAMES) if num_frames is not None else None
    if saved is not None and "img_size" in saved:
        train_size = pair(saved["img_size"], "the img_size of the file's saved config", MAX_PIXELS)
        train_grid = (train_size[0] // ph, train_size[1] // pw)
    else:
        side = math.isqrt(slots)
        if side * side != slots:
            raise ValueError(f"the spatial position table holds {slots} patches, not a square grid")
        train_grid, train_size = (side, side), (side * ph, side * pw)
    if train_grid[0] * train_grid[1] != slots:
        raise ValueError(f"the spatial position table holds {slots} patches, not the {train_grid} grid of the "
                         f"saved config")
    train_frames = sd["temporal_pos_embedding"].shape[1] * tubelet
    cfg = VideoMambaConfig(
        embed_dim=embed_dim, depth=depth_of(sd), num_frames=num_frames or train_frames, tubelet=tubelet,
        img_size=img_size or train_size, patch_size=(ph, pw), in_chans=in_chans,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0, **mixer_config(sd, embed_dim))
    if cfg.num_frames % tubelet:
        raise ValueError(f"num_frames={cfg.num_frames} is not a multiple of the tubelet size {tubelet}")
    sd = dict(sd)
    sd["pos_embed"] = interpolate_spatial(sd["pos_embed"], train_grid, cfg.grid_size[1:])
    sd["temporal_pos_embedding"] = interpolate_temporal(sd["temporal_pos_embedding"], cfg.grid_size[0])
    return cfg, sd
