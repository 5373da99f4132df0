"""Audio Mamba, AuM (kaistmm, IEEE SPL 2024): spectrogram patches, middle class token, three mixers.

Numerically the official AudioMamba (with its defaults: absolute position embedding, one class token
in the middle, no RoPE) with the same state-dict keys, so official files load with strict=True:
patch_embed.proj (Conv2d over the (freq, time) spectrogram), cls_token, pos_embed.pos_embed
(1, 1 + F'T', D) (the class token's entry first), layers.{i}, norm_f, head; AuMCheckpoint reads them.

Mixer variants (the official `aum_type`; they change the key set):
    "Bi-Bi"  separate backward branch, the two directions' sum halved (the constructor's default)
    "Fo-Bi"  one convolution and projection in forward order scanned both ways, only A_b separate, summed
    "Fo-Fo"  one direction
"""
from dataclasses import dataclass
from typing import Dict, Tuple, Union

import torch
from torch import nn

from mambamerge.models.adapter import CheckpointAdapter, depth_of, mixer_config, register_adapter, \
    require, resize_head_table
from mambamerge.models.base import MambaClassifier, TrunkConfig
from mambamerge.models.sizes import pair, patch_grid

# variant -> (mixer variant, divide_out)
AUM_VARIANTS = {"Bi-Bi": ("bi", True), "Fo-Bi": ("bi_shared", False), "Fo-Fo": ("forward", False)}


@dataclass(kw_only=True)
class AuMConfig(TrunkConfig):
    """Architecture of an Audio Mamba. spec_size is (F mel bins, T frames), as the official
    `spectrogram_size`; patch_size and stride are (freq, time) pairs or ints."""

    embed_dim: int = 768
    num_classes: int = 527
    spec_size: Tuple[int, int] = (128, 1024)
    patch_size: Union[int, Tuple[int, int]] = 16
    stride: Union[int, Tuple[int, int]] = 16
    variant: str = "Bi-Bi"

    def __post_init__(self):
        self.spec_size = pair(self.spec_size, "AuMConfig.spec_size")
        self.patch_size = pair(self.patch_size, "AuMConfig.patch_size")
        self.stride = pair(self.stride, "AuMConfig.stride")
        if self.variant not in AUM_VARIANTS:
            raise ValueError(f"AuMConfig.variant must be one of {', '.join(AUM_VARIANTS)}, got {self.variant!r}")
        super().__post_init__()

    @property
    def input_size(self) -> Tuple[int, int]:
        """(T frames, F mel bins): the spectrogram's own axis order."""
        return (self.spec_size[1], self.spec_size[0])

    def grid_for(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """(freq, time) patches of spectrograms of `size` = (T, F)."""
        spec = (size[1], size[0])
        if any(s < p for s, p in zip(spec, self.patch_size)):
            raise ValueError(f"spectrogram size {spec} (F, T) is smaller than the patch size {self.patch_size}")
        return patch_grid(spec, self.patch_size, self.stride)


class PositionTable(nn.Module):
    """The position embedding under the official key `pos_embed.pos_embed`: (1, 1 + M, D), the class
    token's entry first, then the patches in frequency-major order."""

    def __init__(self, num_patches: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))


class SpectrogramEmbed(nn.Module):
    """(batch, T, F) log-mel frames -> (batch, F'T', D) patches, frequency-major (patch f T' + t)."""

    def __init__(self, cfg: AuMConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.stride)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        mel_bins, frames = self.cfg.spec_size
        if spec.ndim != 3:
            raise ValueError(f"expected log-mel spectrograms of shape (batch, {frames} frames, {mel_bins} mel bins), "
                             f"got a tensor of shape {tuple(spec.shape)}")
        if tuple(spec.shape[1:]) != (frames, mel_bins):
            hint = (" (time and frequency swapped?)" if tuple(spec.shape[1:]) == (mel_bins, frames) else "")
            raise ValueError(f"the model was built for spectrograms of {frames} frames x {mel_bins} mel bins "
                             f"(batch, T, F), got {spec.shape[1]} x {spec.shape[2]}{hint}; pad or crop the "
                             f"frames, or load the checkpoint for that size with load_checkpoint(path, "
                             f"spec_size=(F, T)) (interpolates the position embedding)")
        return self.proj(spec.transpose(1, 2)[:, None]).flatten(2).transpose(1, 2)


class AudioMamba(MambaClassifier):
    """AuM classifier.

    forward(spectrograms (batch, T, F)) -> logits (batch, num_classes).
    Tokens: frequency-major patches with the class token in the middle (index M // 2); the class
    token gets the position table's first entry, patch j its entry 1 + j.
    """

    family = "aum"
    input_kind = "spectrograms"
    config_class = AuMConfig
    input_axes = ("frames", "mel bins")
    token_axes = ("freq", "time")
    named_configs = {
        # 128 mel bins x 1024 frames, 16x16 patches, AudioSet's 527 classes; variant Bi-Bi
        "aum_tiny": dict(embed_dim=192, depth=24),
        "aum_small": dict(embed_dim=384, depth=24),
        "aum_base": dict(embed_dim=768, depth=24),
        # the audio demo model: 128 mel bins x 128 frames (1.28 s: FSDD's spoken digits), 16x16 patches ->
        # 8 x 8 tokens + the class token; 12 blocks so that 80% average reduction stays reachable
        "aum_nano": dict(embed_dim=32, depth=12, d_state=8, spec_size=(128, 128), num_classes=10),
    }

    def __init__(self, cfg: AuMConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        mixer, divide_out = AUM_VARIANTS[cfg.variant]
        self._build_trunk(cfg, divide_out=divide_out, variant=mixer)
        self.patch_embed = SpectrogramEmbed(cfg)
        self.pos_embed = PositionTable(cfg.num_patches, d)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self._init_weights(self.pos_embed.pos_embed, self.cls_token)

    @classmethod
    def input_shape_for(cls, cfg: AuMConfig) -> Tuple[int, int]:
        mel_bins, frames = cfg.spec_size
        return (frames, mel_bins)

    def embed(self, spec: torch.Tensor) -> torch.Tensor:
        """spectrograms (batch, T, F) -> tokens (batch, M + 1, D) with the class token at M // 2."""
        x = self.patch_embed(spec)
        pos = self.pos_embed.pos_embed.to(x.dtype)
        c = self.layout.cls_index
        cls = (self.cls_token.to(x.dtype) + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = x + pos[:, 1:]
        return self.pos_drop(torch.cat((x[:, :c], cls, x[:, c:]), dim=1))


AUM_MEL_BINS = 128
# the tensors the architecture is read from, and their number of axes
_REQUIRED = {"patch_embed.proj.weight": 4, "pos_embed.pos_embed": 3, "cls_token": 3, "norm_f.weight": 1,
             "layers.0.mixer.in_proj.weight": 2, "layers.0.mixer.A_log": 2, "layers.0.mixer.conv1d.weight": 3,
             "layers.0.mixer.dt_proj.weight": 2}


def variant_of(sd: Dict[str, torch.Tensor]) -> str:
    """The mixer variant a state dict's keys describe (see AUM_VARIANTS)."""
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


@register_adapter
class AuMCheckpoint(CheckpointAdapter):
    """Official files are plain state dicts. Inferred from the tensors: width, depth, the mixer, patch
    size, classes and the variant (conv1d_b: Bi-Bi; A_b_log alone: Fo-Bi; neither: Fo-Fo). The position
    table only holds F'T' patches, so the spectrogram size comes from our metadata, from
    train_spec_size=(F, T), or from AuM's 128 mel bins (then T follows); the stride is the patch size
    unless given. Another spec_size interpolates the table bilinearly (antialiased), as the official
    code does."""

    model_class = AudioMamba
    title = "Audio Mamba (AuM)"
    takes = "AuM takes spec_size=(F, T), train_spec_size=(F, T) and stride="

    def matches(self, state_dict: Dict[str, torch.Tensor]) -> bool:
        return "pos_embed.pos_embed" in state_dict

    def infer(self, raw, spec_size=None, train_spec_size=None, stride=None, **unknown):
        """Run at spec_size (F, T); default: what the file was trained at. The grid is (F', T')."""
        self.refuse(unknown)
        sd, saved = raw.state_dict, raw.config
        if any(k.startswith(("cls_token_head", "cls_token_tail", "rope.")) for k in sd):
            raise ValueError("this AuM checkpoint uses two class tokens or RoPE, which mambamerge does not "
                             "implement (the released models use one middle class token and absolute positions)")
        require(sd, _REQUIRED, "Audio Mamba")
        embed_dim, in_chans, pf, pt = sd["patch_embed.proj.weight"].shape
        if in_chans != 1:
            raise ValueError(f"the patch embedding takes {in_chans} channels; AuM spectrograms have one")
        patch = (pf, pt)
        slots = sd["pos_embed.pos_embed"].shape[1] - 1
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
            raise ValueError(f"the position table holds {slots} patches but a {train_size[0]}x{train_size[1]} "
                             f"(F x T) spectrogram with stride {stride} gives {train_grid[0]}x{train_grid[1]}; "
                             f"check train_spec_size and stride")
        cfg = AuMConfig(embed_dim=embed_dim, depth=depth_of(sd), spec_size=spec_size or train_size,
                        patch_size=patch, stride=stride, variant=variant_of(sd),
                        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                        **mixer_config(sd, embed_dim))
        return cfg, train_grid

    def adapt(self, state_dict, grid, cfg):
        state = dict(state_dict)
        state["pos_embed.pos_embed"] = interpolate_table(state["pos_embed.pos_embed"], grid, cfg.grid_size)
        return state
