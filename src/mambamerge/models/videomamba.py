"""VideoMamba (OpenGVLab, ECCV 2024): tubelet tokens, class token at the head, bidirectional blocks.

Numerically the official video model (`videomamba_tiny/small/middle` of the video_sm code) with the
same state-dict keys, so official checkpoints load with strict=True: patch_embed.proj (a Conv3d with
kernel = stride = (tubelet, p, p)), cls_token, pos_embed (1, 1 + H'W', D) (the spatial table, the
class token's entry first), temporal_pos_embedding (1, T', D), layers.{i}, norm_f, head;
VideoMambaCheckpoint reads them.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mambamerge.models.adapter import CheckpointAdapter, depth_of, mixer_config, register_adapter, \
    require, resize_head_table
from mambamerge.models.base import MambaClassifier, TrunkConfig
from mambamerge.models.sizes import MAX_PIXELS, pair, patch_grid, whole

Size3 = Tuple[int, int, int]


@dataclass(kw_only=True)
class VideoMambaConfig(TrunkConfig):
    """Architecture of a VideoMamba. img_size and patch_size may be ints or (height, width) pairs;
    the spatial stride equals the patch size and the temporal one the tubelet size, as in the
    official model."""

    num_frames: int = 8
    tubelet: int = 1
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: Union[int, Tuple[int, int]] = 16
    in_chans: int = 3
    head_drop_rate: float = 0.0

    def __post_init__(self):
        self.img_size = pair(self.img_size, "VideoMambaConfig.img_size")
        self.patch_size = pair(self.patch_size, "VideoMambaConfig.patch_size")
        for name in ("num_frames", "tubelet", "in_chans"):
            setattr(self, name, whole(getattr(self, name), f"VideoMambaConfig.{name}"))
        if not 0.0 <= self.head_drop_rate < 1.0:
            raise ValueError(f"VideoMambaConfig.head_drop_rate must be in [0, 1), got {self.head_drop_rate!r}")
        super().__post_init__()

    @property
    def input_size(self) -> Size3:
        """(frames, height, width)."""
        return (self.num_frames, *self.img_size)

    def grid_for(self, size: Size3) -> Size3:
        """(frames, rows, cols) of the token grid of clips of `size` = (T, H, W)."""
        if size[0] < self.tubelet:
            raise ValueError(f"{size[0]} frames are fewer than one tubelet of {self.tubelet} frames")
        if any(i < p for i, p in zip(size[1:], self.patch_size)):
            raise ValueError(f"frame size {tuple(size[1:])} is smaller than the patch size {self.patch_size}")
        kernel = (self.tubelet, *self.patch_size)
        return patch_grid(size, kernel, kernel)


class TubeletEmbed(nn.Module):
    """(batch, C, T, H, W) -> (batch, D, T', H', W') through a Conv3d with kernel = stride."""

    def __init__(self, cfg: VideoMambaConfig):
        super().__init__()
        self.cfg = cfg
        kernel = (cfg.tubelet, *cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if video.ndim != 5:
            raise ValueError(f"expected clips of shape (batch, {cfg.in_chans}, frames, H, W), got a tensor of shape "
                             f"{tuple(video.shape)}")
        if video.shape[1] != cfg.in_chans:
            raise ValueError(f"the model takes {cfg.in_chans}-channel frames, got {video.shape[1]} channels (shape "
                             f"{tuple(video.shape)}); clips are (batch, channels, frames, H, W)")
        if video.shape[2] != cfg.num_frames:
            fewer = "too few" if video.shape[2] < cfg.num_frames else "too many"
            raise ValueError(f"{fewer} frames: the model was built for clips of {cfg.num_frames} frames, got "
                             f"{video.shape[2]}; sample {cfg.num_frames} frames per clip, or load the checkpoint for "
                             f"that length with load_checkpoint(path, num_frames=...) (interpolates the temporal "
                             f"position embedding)")
        if tuple(video.shape[3:]) != cfg.img_size:
            raise ValueError(f"the model was built for {cfg.img_size[0]}x{cfg.img_size[1]} frames, got "
                             f"{video.shape[3]}x{video.shape[4]}; resize the clip, or load the checkpoint for that "
                             f"size with load_checkpoint(path, img_size=...)")
        return self.proj(video)


class VideoMamba(MambaClassifier):
    """VideoMamba classifier.

    forward(clips (batch, C, T, H, W)) -> logits (batch, num_classes).
    Tokens: the class token (+ the spatial table's first entry), then the patches frame-major
    (token 1 + t H'W' + h W' + w), each + its spatial and its frame's temporal embedding.
    """

    family = "videomamba"
    input_kind = "clips"
    config_class = VideoMambaConfig
    input_axes = ("frames", "height", "width")
    token_axes = ("frame", "row", "col")
    cls_position = "head"
    named_configs = {
        # the official video_sm configs: 224x224, patch 16, tubelet 1, 8 frames; 1000 classes as the
        # official constructor (Kinetics-400 files have 400 and load with it)
        "videomamba_tiny": dict(embed_dim=192, depth=24),
        "videomamba_small": dict(embed_dim=384, depth=24),
        "videomamba_middle": dict(embed_dim=576, depth=32),
        # the video demo model: 8 grey 32x32 frames (moving Fashion-MNIST), 8x8 patches, tubelets of 2
        # frames -> 4 x 4 x 4 tokens + the class token; 12 blocks so that 80% average reduction stays reachable
        "videomamba_nano": dict(embed_dim=32, depth=12, d_state=8, num_frames=8, tubelet=2, img_size=32, patch_size=8,
                                in_chans=1, num_classes=40),
    }

    def __init__(self, cfg: VideoMambaConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        frames, rows, cols = cfg.grid_size
        self.patch_embed = TubeletEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, rows * cols + 1, d))
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, frames, d))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self._build_trunk(cfg, head_drop_rate=cfg.head_drop_rate, divide_out=False)
        self._init_weights(self.pos_embed, self.cls_token, self.temporal_pos_embedding)

    @classmethod
    def input_shape_for(cls, cfg: VideoMambaConfig) -> Tuple[int, int, int, int]:
        return (cfg.in_chans, cfg.num_frames, *cfg.img_size)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """clips (batch, C, T, H, W) -> tokens (batch, 1 + T'H'W', D), class token first."""
        x = self.patch_embed(video)  # (B, D, T', H', W')
        batch = x.shape[0]
        x = x.permute(0, 2, 3, 4, 1).flatten(2, 3)  # (B, T', H'W', D); flatten, not reshape(-1): B may be 0
        pos = self.pos_embed.to(x.dtype)
        x = x + pos[:, None, 1:] + self.temporal_pos_embedding.to(x.dtype)[:, :, None]
        cls = (self.cls_token.to(x.dtype) + pos[:, :1]).expand(batch, -1, -1)
        return self.pos_drop(torch.cat((cls, x.flatten(1, 2)), dim=1))


MAX_FRAMES = 4096
# the tensors the architecture is read from, and their number of axes
_REQUIRED = {"patch_embed.proj.weight": 5, "pos_embed": 3, "temporal_pos_embedding": 3, "cls_token": 3,
             "norm_f.weight": 1, "layers.0.mixer.in_proj.weight": 2, "layers.0.mixer.A_log": 2,
             "layers.0.mixer.conv1d.weight": 3, "layers.0.mixer.dt_proj.weight": 2,
             "layers.0.mixer.conv1d_b.weight": 3}


def interpolate_spatial(pos_embed: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """(1, 1 + old H'W', D), class entry first -> (1, 1 + new H'W', D); the patch part resized bicubically."""
    return resize_head_table(pos_embed, old_grid, new_grid, mode="bicubic", align_corners=False)


def interpolate_temporal(table: torch.Tensor, frames: int) -> torch.Tensor:
    """(1, T', D) -> (1, frames, D), linearly."""
    if table.shape[1] == frames:
        return table
    out = F.interpolate(table.permute(0, 2, 1).float(), size=frames, mode="linear", align_corners=False)
    return out.permute(0, 2, 1).to(table.dtype)


@register_adapter
class VideoMambaCheckpoint(CheckpointAdapter):
    """Official files hold the weights under "model" (mambamerge.checkpoint unpacks them). Inferred from
    the tensors: width, depth, the mixer, patch size, tubelet, frames (temporal table x tubelet), frame
    size (square spatial table x patch, unless our metadata says otherwise) and classes. Another frame
    size or clip length interpolates the spatial table bicubically (the class entry kept) and the
    temporal one linearly, as the official fine-tuning does."""

    model_class = VideoMamba
    title = "VideoMamba"
    takes = "VideoMamba takes img_size= and num_frames="

    def matches(self, state_dict: Dict[str, torch.Tensor]) -> bool:
        return "temporal_pos_embedding" in state_dict

    def infer(self, raw, img_size=None, num_frames: Optional[int] = None, **unknown):
        """Run at img_size (int or (H, W)) and num_frames; both default to what the file was trained at.
        The grid is (T', H', W') of the file's tables."""
        self.refuse(unknown)
        sd, saved = raw.state_dict, raw.config
        require(sd, _REQUIRED, "VideoMamba")
        embed_dim, in_chans, tubelet, ph, pw = sd["patch_embed.proj.weight"].shape
        slots = sd["pos_embed"].shape[1] - 1
        img_size = pair(img_size, "img_size=", MAX_PIXELS) if img_size is not None else None
        num_frames = whole(num_frames, "num_frames=", MAX_FRAMES) if num_frames is not None else None
        if saved is not None and "img_size" in saved:
            train_size = pair(saved["img_size"], "the img_size of the file's saved config", MAX_PIXELS)
            train_grid = patch_grid(train_size, (ph, pw), (ph, pw))
        else:
            side = math.isqrt(slots)
            if side * side != slots:
                raise ValueError(f"the spatial position table holds {slots} patches, not a square grid")
            train_grid, train_size = (side, side), (side * ph, side * pw)
        if train_grid[0] * train_grid[1] != slots:
            raise ValueError(f"the spatial position table holds {slots} patches, not the {train_grid} grid of the "
                             f"saved config")
        train_frames = sd["temporal_pos_embedding"].shape[1]
        cfg = VideoMambaConfig(
            embed_dim=embed_dim, depth=depth_of(sd), num_frames=num_frames or train_frames * tubelet, tubelet=tubelet,
            img_size=img_size or train_size, patch_size=(ph, pw), in_chans=in_chans,
            num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0, **mixer_config(sd, embed_dim))
        if cfg.num_frames % tubelet:
            raise ValueError(f"num_frames={cfg.num_frames} is not a multiple of the tubelet size {tubelet}")
        return cfg, (train_frames, *train_grid)

    def adapt(self, state_dict, grid, cfg):
        state = dict(state_dict)
        state["pos_embed"] = interpolate_spatial(state["pos_embed"], grid[1:], cfg.grid_size[1:])
        state["temporal_pos_embedding"] = interpolate_temporal(state["temporal_pos_embedding"], cfg.grid_size[0])
        return state
