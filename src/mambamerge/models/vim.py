"""Vision Mamba (Vim): patch tokens with a middle class token, bidirectional Mamba blocks, cls head.

Numerically the official model (hustvl/Vim, "bimambav2 ... midclstok div2" variants) and with the
same state-dict keys, so official checkpoints load with strict=True; VimCheckpoint reads them.
"""
import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from mambamerge.models.adapter import (CheckpointAdapter, depth_of, listing, mixer_config, register_adapter,
                                       resize_grid)
from mambamerge.models.base import MambaClassifier, TrunkConfig
from mambamerge.models.sizes import MAX_PIXELS, pair, patch_grid, whole

Size2 = Tuple[int, int]


@dataclass(kw_only=True)
class VimConfig(TrunkConfig):
    """Architecture of a Vim. img_size/patch_size/stride may be ints or (height, width) pairs;
    divide_out halves the sum of the two scan directions (the official "div2" models)."""

    img_size: Union[int, Size2] = 224
    patch_size: Union[int, Size2] = 16
    stride: Union[int, Size2] = 16
    in_chans: int = 3
    divide_out: bool = True

    def __post_init__(self):
        self.img_size = pair(self.img_size, "VimConfig.img_size")
        self.patch_size = pair(self.patch_size, "VimConfig.patch_size")
        self.stride = pair(self.stride, "VimConfig.stride")
        self.in_chans = whole(self.in_chans, "VimConfig.in_chans")
        super().__post_init__()

    @property
    def input_size(self) -> Size2:
        return self.img_size

    def grid_for(self, size: Size2) -> Size2:
        if any(i < p for i, p in zip(size, self.patch_size)):
            raise ValueError(f"image size {tuple(size)} is smaller than the patch size {self.patch_size}")
        return patch_grid(size, self.patch_size, self.stride)


class PatchEmbed(nn.Module):
    """(batch, C, H, W) -> (batch, M, D) raster-order patch tokens through a strided conv."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.in_chans = cfg.in_chans
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (batch, {self.in_chans}, H, W), got a tensor of shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"the model takes {self.in_chans}-channel images, got {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)}); convert the images or build the model with "
                             f"in_chans={x.shape[1]}")
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"the model was built for {self.img_size[0]}x{self.img_size[1]} images, got "
                             f"{x.shape[2]}x{x.shape[3]}; resize the input, or rebuild the model for that size "
                             f"with load_checkpoint(path, img_size=...) which interpolates the position embedding")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionMamba(MambaClassifier):
    """Vim classifier.

    forward(images (batch, C, H, W)) -> logits (batch, num_classes).
    Tokens: raster-order patches with the class token in the middle (index M // 2), then pos_embed.
    """

    family = "vim"
    input_kind = "images"
    config_class = VimConfig
    input_axes = ("height", "width")
    token_axes = ("row", "col")
    named_configs = {
        "vim_tiny": dict(embed_dim=192, depth=24),
        "vim_small": dict(embed_dim=384, depth=24),
        "vim_base": dict(embed_dim=768, depth=24),
        "vim_tiny_plus": dict(embed_dim=192, depth=24, stride=8),
        "vim_small_plus": dict(embed_dim=384, depth=24, stride=8),
        # the image demo model: grey 56x56 images, 4x4 patches (ImageNet's token geometry: 14x14 patches +
        # the middle class token), 10 classes; 12 blocks so that 80% average reduction stays reachable
        # under ToMe's 50%-per-step limit
        "vim_nano": dict(embed_dim=48, depth=12, d_state=8, img_size=56, patch_size=4, stride=4, in_chans=1,
                         num_classes=10),
        "vim_pico": dict(embed_dim=32, depth=2, img_size=32, patch_size=8, stride=8, d_state=8, num_classes=10),
    }
    # the demo model takes Fashion-MNIST as mambamerge's IDX loader gives it (28x28 resized bilinearly, no
    # crop, its training pixels' mean / std)
    named_pretrained_cfgs = {"vim_nano": dict(interpolation="bilinear", crop_pct=1.0, mean=(0.2860,), std=(0.3530,))}
    # the official entry-point names of hustvl/Vim (registered with timm as aliases)
    aliases = {
        "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny",
        "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_tiny_plus",
        "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small",
        "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2": "vim_small_plus",
        "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2": "vim_base",
    }

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self._build_trunk(cfg, divide_out=cfg.divide_out)
        self._init_weights(self.pos_embed, self.cls_token)

    @property
    def cls_index(self) -> int:
        """Index of the class token in the embedded sequence (middle of the patch tokens)."""
        return self.layout.cls_index

    @classmethod
    def input_shape_for(cls, cfg: VimConfig) -> Tuple[int, int, int]:
        return (cfg.in_chans, *cfg.img_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (batch, C, H, W) -> tokens (batch, M + 1, D) with the class token at cls_index."""
        x = self.patch_embed(images)
        c = self.cls_index
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat((x[:, :c], cls, x[:, c:]), dim=1)
        return self.pos_drop(x + self.pos_embed.to(x.dtype))


def interpolate_pos_embed(pos_embed: torch.Tensor, old_grid: Size2, new_grid: Size2) -> torch.Tensor:
    """Resize a middle-class-token position embedding.

    pos_embed: (1, old_M + 1, D) with the class slot at old_M // 2 -> (1, new_M + 1, D) with the class
    slot at new_M // 2; the patch part is resized bicubically on its 2-D grid.
    """
    old_m = old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != old_m + 1:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} slots, expected {old_m + 1} for a grid {old_grid}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    c = old_m // 2
    cls = pos_embed[:, c:c + 1]
    patches = resize_grid(torch.cat((pos_embed[:, :c], pos_embed[:, c + 1:]), dim=1), old_grid, new_grid,
                          mode="bicubic", align_corners=False)
    nc = patches.shape[1] // 2
    return torch.cat((patches[:, :nc], cls, patches[:, nc:]), dim=1)


# the tensors the architecture is read from, with the dimensions a Vim gives them
_REQUIRED = {"patch_embed.proj.weight": ("embed_dim", "channels", "patch_h", "patch_w"),
             "pos_embed": ("1", "tokens", "embed_dim"), "cls_token": ("1", "1", "embed_dim"),
             "norm_f.weight": ("embed_dim",), "layers.0.mixer.in_proj.weight": ("2 x d_inner", "embed_dim"),
             "layers.0.mixer.A_log": ("d_inner", "d_state"), "layers.0.mixer.conv1d.weight": ("d_inner", "1", "d_conv"),
             "layers.0.mixer.dt_proj.weight": ("d_inner", "dt_rank")}
_OPTIONAL = {"head.weight": ("classes", "embed_dim")}
_FALLBACK_SIZE = 224
_CLI_CANNOT = ("the command line cannot set these: convert the file once in Python, mambamerge.save_checkpoint "
               "records them")


def _check_layout(sd: Dict[str, torch.Tensor]) -> int:
    """Check the tensors the architecture is read from and the block numbering; returns the depth.
    Done before anything is built, so a file cannot ask for more than its own tensors describe."""
    for key, dims in {**_REQUIRED, **_OPTIONAL}.items():
        if key in sd and (sd[key].ndim != len(dims) or min(sd[key].shape) < 1):
            raise ValueError(f"{key} has shape {tuple(sd[key].shape)}, a Vim's is ({', '.join(dims)}): the "
                             f"file is damaged or not a Vim checkpoint")
    return depth_of(sd)


def _user_pair(value, what: str) -> Size2:
    return pair(value, what, MAX_PIXELS, unit=" of pixels")


def _recorded(raw) -> Tuple[Optional[Size2], Optional[Size2]]:
    """(training size, stride) a file records, each None when it does not: our saved config, or an
    official file's args.input_size and the stride in args.model."""
    def read(value, what: str) -> Size2:
        try:
            return _user_pair(value, what)
        except ValueError as err:
            raise ValueError(f"{err}; the file is damaged or was not written by mambamerge") from None

    size, stride = raw.config.get("img_size"), raw.config.get("stride")
    size = read(size, "the saved config metadata's img_size") if size is not None else None
    stride = read(stride, "the saved config metadata's stride") if stride is not None else None
    if raw.args.get("input_size") is not None:
        size = read(raw.args["input_size"], "args.input_size")
    match = re.search(r"stride(\d+)", str(raw.args.get("model", "")))
    if match:
        stride = read(int(match.group(1)), f"the stride in args.model {raw.args['model']!r}")
    return size, stride


def _infer_stride(num_slots: int, patch: Size2, img_size: Optional[Size2], stride: Optional[Size2],
                  train: Optional[Size2]) -> Tuple[Size2, Size2]:
    """Returns (stride, training grid) from the position-embedding length and what is known (None: not
    known) of the stride and the training size."""
    num_patches = num_slots - 1
    if train is not None and stride is not None:
        grid = patch_grid(train, patch, stride)
    else:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"pos_embed holds {num_patches} patches, not a square grid; pass "
                             f"train_img_size=(H, W) and stride= to load_checkpoint ({_CLI_CANNOT})")
        grid = (side, side)
        if stride is None:
            ref = train or img_size or (_FALLBACK_SIZE, _FALLBACK_SIZE)
            if side == 1:
                stride = patch
            else:
                steps = [(r - p) / (side - 1) for r, p in zip(ref, patch)]
                if not all(s >= 1 and s == int(s) for s in steps):
                    fix = ("train_img_size= (the resolution the checkpoint was trained at) or stride= to "
                           f"load_checkpoint ({_CLI_CANNOT})" if img_size and not train
                           else "the resolution it was trained at (img_size=, on the command line --img-size)")
                    raise ValueError(
                        f"cannot infer the patch stride: a {side}x{side} patch grid with {patch[0]}x{patch[1]} "
                        f"patches does not fit a {ref[0]}x{ref[1]} image; pass {fix}")
                stride = tuple(int(s) for s in steps)
                if not (train or img_size) and any(s > p for s, p in zip(stride, patch)):
                    raise ValueError(
                        f"the file does not record the resolution it was trained at, and at the default "
                        f"{ref[0]}x{ref[1]} its {side}x{side} grid of {patch[0]}x{patch[1]} patches would need a "
                        f"stride of {stride[0]}, which skips pixels between patches; pass the resolution it was "
                        f"trained at (img_size=, on the command line --img-size)")
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f"pos_embed holds {num_patches} patches but train size {train} with stride {stride} "
                         f"gives a {grid[0]}x{grid[1]} grid; check train_img_size and stride")
    return stride, grid


@register_adapter
class VimCheckpoint(CheckpointAdapter):
    """Official Vim files (the weights under "model" or "model_ema", args.input_size and the stride in
    args.model) and ours; the reader of files no other family matches, so it says what they lack.
    Inferred from the tensors: width, depth, the mixer, patch size, channels, classes; the stride from
    the file, the options or the position-table length at the training size (default 224)."""

    model_class = VisionMamba
    title = "Vision Mamba (Vim)"
    takes = "Vim takes img_size=, stride= and train_img_size="
    fallback = True

    def matches(self, state_dict: Dict[str, torch.Tensor]) -> bool:
        return False  # the fallback: files of the other families are recognised by their own keys

    def infer(self, raw, img_size=None, stride=None, train_img_size=None, **unknown) -> Tuple[VimConfig, Size2]:
        """Built for `img_size` (default: the training resolution the file records or train_img_size,
        else 224)."""
        self.refuse(unknown)
        sd = raw.state_dict
        missing = [k for k in _REQUIRED if k not in sd]
        if missing:
            raise ValueError(f"not a Vision Mamba (Vim) checkpoint: missing {listing(missing)}; "
                             f"the file has keys like {listing(sd)}")
        depth = _check_layout(sd)
        embed_dim, in_chans, ph, pw = sd["patch_embed.proj.weight"].shape
        mixer = mixer_config(sd, embed_dim)
        size = _user_pair(img_size, "img_size=") if img_size is not None else None
        recorded_size, recorded_stride = _recorded(raw)
        stride = _user_pair(stride, "stride=") if stride is not None else recorded_stride
        train = _user_pair(train_img_size, "train_img_size=") if train_img_size is not None else recorded_size
        stride, grid = _infer_stride(sd["pos_embed"].shape[1], (ph, pw), size, stride, train)
        size = size or train or (_FALLBACK_SIZE, _FALLBACK_SIZE)
        try:
            cfg = VimConfig(embed_dim=embed_dim, depth=depth, img_size=size, patch_size=(ph, pw), stride=stride,
                            in_chans=in_chans, num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                            **mixer)
        except ValueError as err:
            raise ValueError(f"the tensors describe no buildable Vim: {err}") from None
        return cfg, grid

    def adapt(self, state_dict, grid, cfg):
        state = dict(state_dict)
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], grid, cfg.grid_size)
        return state
