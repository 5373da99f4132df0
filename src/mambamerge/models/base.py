"""What every model family shares: the trunk's config, the stack of blocks, the final norm, the readout
and the head.

A family's config subclasses `TrunkConfig` (adding its input sizes, `input_size` and `grid_for`); its
model subclasses `MambaClassifier`, builds its embedding and calls `_build_trunk`, and defines
`embed(x)` and `input_shape_for(cfg)`; running the blocks and reducing tokens between them is
`runner.run_blocks`, the same for every family.

The classifier follows timm's model conventions, so timm's data, optimiser and training tools take it
as one of theirs: `pretrained_cfg`, `no_weight_decay`, `forward_features` (the normalised tokens),
`forward_head`, `get_classifier`, `reset_classifier`, `num_features`.
"""
import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Dict, Optional, Set, Tuple, Union

import torch
from torch import nn

from mambamerge.data.folders import normalisation
from mambamerge.models.blocks import Block, DropPath, RMSNorm
from mambamerge.models.mixer import MambaMixer
from mambamerge.ops import MIXER_IMPLS
from mambamerge.merge.state import TokenState
from mambamerge.runner import BlockOutput, class_feature, class_token_first, run_blocks
from mambamerge.tokens import TokenLayout


@dataclass(kw_only=True)
class TrunkConfig:
    """What every family's trunk takes: width, depth, the SSM's sizes (dt_rank: ceil(embed_dim / 16)
    when None, as the official models), the head and the regularisation; validated here once.

    A family's config adds its input sizes and defines `input_size` (one sample's axes, without
    channels, in the input's order) and `grid_for(size)` (the token grid of an input of that size)."""

    embed_dim: int = 192
    depth: int = 24
    num_classes: int = 1000
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Optional[int] = None
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    positive: ClassVar[Tuple[str, ...]] = ("embed_dim", "depth", "d_state", "d_conv", "expand", "dt_rank")

    def __post_init__(self):
        name = type(self).__name__
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.embed_dim / 16)
        for field in self.positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{field} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"{name}.num_classes must be a whole number >= 0, got {self.num_classes!r}")
        for field in ("drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{name}.{field} must be in [0, 1), got {getattr(self, field)!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"{name}.norm_eps must be positive, got {self.norm_eps!r}")
        self.grid_for(self.input_size)

    @property
    def input_size(self) -> Tuple[int, ...]:
        """One input sample's sizes without channels, in the input's axis order."""
        raise NotImplementedError

    def grid_for(self, size: Tuple[int, ...]) -> Tuple[int, ...]:
        """The token grid of an input of `size` (input_size's form); a ValueError when it is smaller than
        one patch."""
        raise NotImplementedError

    @property
    def grid_size(self) -> Tuple[int, ...]:
        return self.grid_for(self.input_size)

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)

    def to_dict(self) -> dict:
        return asdict(self)


class MambaClassifier(nn.Module):
    """embed -> blocks (two streams: hidden, residual; tokens reduced between blocks once patched with
    mambamerge.patch) -> final add + RMSNorm -> feature at the class token -> head.

    Subclasses set `config_class` (a TrunkConfig), `family`, `input_kind`, the axes' names and the named
    configurations below, and define `embed` and `input_shape_for`; they may refine
    `default_pretrained_cfg`.
    """

    cfg = None
    input_kind = None  # what one input sample is: "images" (C, H, W), "clips" (C, T, H, W), "spectrograms" (T, F)
    input_axes: Tuple[str, ...] = ()  # the names of the config's input_size axes
    token_axes: Tuple[str, ...] = ()  # the names of the token grid's axes
    cls_position = "middle"  # where the class token sits in the embedded sequence (TokenLayout's cls)
    # the named configurations of the family (create_model's names) -> config keyword arguments; their
    # refinements of default_pretrained_cfg; other names for them (e.g. official entry points)
    named_configs: Dict[str, dict] = {}
    named_pretrained_cfgs: Dict[str, dict] = {}
    aliases: Dict[str, str] = {}
    classes = None  # the class names a checkpoint records (load_checkpoint)
    merge_recipe = None  # the token reduction a fine-tuned checkpoint records (load_checkpoint; a MergeRecipe)
    # leaf names of the embeddings kept out of weight decay (see no_weight_decay)
    no_weight_decay_leaves = ("pos_embed", "cls_token", "temporal_pos_embedding")

    def _build_trunk(self, cfg: TrunkConfig, head_drop_rate: float = 0.0, **mixer_options) -> None:
        """Blocks `layers.{i}`, `norm_f`, `head` as `cfg` describes (mixer_options: the family's mixer
        variant). The official models give block i the stochastic depth rate of block i - 1 of a linear
        schedule (block 0 none), and the final addition the full rate."""
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        block_rates = [0.0] + rates[:-1]
        mixer = dict(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, dt_rank=cfg.dt_rank, **mixer_options)
        self.layers = nn.ModuleList(Block(cfg.embed_dim, drop_path=block_rates[i], norm_eps=cfg.norm_eps, **mixer)
                                    for i in range(cfg.depth))
        self.norm_f = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.drop_path = DropPath(cfg.drop_path_rate)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.token_reducer = None  # set by mambamerge.patch; not part of the state dict

    def _init_weights(self, *tables: nn.Parameter) -> None:
        """The official initialisation: the position tables and class token (`tables`, in this order)
        truncated normal with std 0.02, the patch embedding lecun normal with a zero bias, then the trunk."""
        for table in tables:
            nn.init.trunc_normal_(table, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()) / 0.87962566103423978)  # lecun normal
        nn.init.zeros_(self.patch_embed.proj.bias)
        self._init_trunk()

    def _init_trunk(self) -> None:
        """The official initialisation of the head and of each block's output projection (prenorm
        residual rescaling by 1/sqrt(depth))."""
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for block in self.layers:
            out_proj = block.mixer.out_proj
            nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                out_proj.weight /= math.sqrt(len(self.layers))

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def r(self) -> Optional[int]:
        """Tokens each reduction step removes (ToMe's knob; see TokenReducer.r), None when dense. Set it on
        a patched model to change the schedule in place: `model.r = 8` is `patch(model, method, r=8)` with
        the method, options and spacing it was patched with, validated the same way."""
        return None if self.token_reducer is None else self.token_reducer.r

    @r.setter
    def r(self, value: int) -> None:
        if self.token_reducer is None:
            raise ValueError("model.r sets the tokens per step of a token-reducing model; patch it first, e.g. "
                             "mambamerge.patch(model, 'tome', r=8)")
        self.token_reducer.r = value

    @property
    def layout(self) -> TokenLayout:
        """The layout of the embedded tokens at the model's own input size."""
        return self.token_layout()

    def token_layout(self, input_size=None) -> TokenLayout:
        """The layout of the embedded tokens for an input of `input_size` (the config's input_size form:
        Vim (H, W), VideoMamba (T, H, W), AuM (T, F); an int for every axis; the model's size when None)."""
        if input_size is None:
            return TokenLayout(self.cfg.grid_size, self.token_axes, cls=self.cls_position)
        axes = len(self.cfg.input_size)
        size = (input_size,) * axes if isinstance(input_size, int) and not isinstance(input_size, bool) else input_size
        if (not isinstance(size, (tuple, list)) or len(size) != axes
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ValueError(f"input_size must be ({', '.join(self.input_axes)}) or one int, positive, got "
                             f"{input_size!r}")
        return TokenLayout(self.cfg.grid_for(tuple(size)), self.token_axes, cls=self.cls_position)

    @classmethod
    def input_shape_for(cls, cfg) -> Tuple[int, ...]:
        """Shape of one input sample (without the batch axis) of a model with config cfg."""
        raise NotImplementedError

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one input sample (without the batch axis)."""
        return self.input_shape_for(self.cfg)

    @classmethod
    def default_pretrained_cfg(cls, cfg) -> dict:
        """timm's pretrained_cfg of a model with config cfg (no weights to download): the input size, the
        classes, and the official evaluation transform: bicubic resize to size / crop_pct, centre crop,
        normalisation (mambamerge.data.folders.normalisation)."""
        channels = getattr(cfg, "in_chans", None)
        pretrained = dict(input_size=cls.input_shape_for(cfg), num_classes=cfg.num_classes, interpolation="bicubic",
                          crop_pct=0.875, crop_mode="center", fixed_input_size=True, first_conv="patch_embed.proj",
                          classifier="head")
        if channels is not None:
            mean, std = normalisation(channels)
            pretrained.update(mean=mean, std=std)
        return pretrained

    @property
    def pretrained_cfg(self) -> dict:
        """timm's description of the model's input and evaluation transform (see default_pretrained_cfg;
        a registered name may refine it, timm.create_model overlays its pretrained_cfg_overlay). Its
        input_size and num_classes always follow the model."""
        base = self.__dict__.get("_pretrained_cfg") or self.default_pretrained_cfg(self.cfg)
        return dict(base, input_size=self.input_shape, num_classes=self.num_classes)

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: dict) -> None:
        self.__dict__["_pretrained_cfg"] = dict(value)

    @property
    def default_cfg(self) -> dict:
        """timm's older name of pretrained_cfg."""
        return self.pretrained_cfg

    @property
    def num_features(self) -> int:
        """Width of the pooled feature the head reads (timm's num_features and head_hidden_size)."""
        return self.norm_f.weight.shape[0]

    head_hidden_size = num_features

    def no_weight_decay(self) -> Set[str]:
        """Names of the parameters kept out of weight decay, by `mambamerge train` and by timm's
        create_optimizer_v2 (both also spare every 1-D parameter): the position and class embeddings (as
        the official Vim, VideoMamba and AuM trainings) and every mixer's A_log and D (as mamba_ssm)."""
        names = {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in self.no_weight_decay_leaves}
        for prefix, module in self.named_modules():
            if isinstance(module, MambaMixer):
                names |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
        return names

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A freshly initialised head for num_classes (0: none, forward gives the pooled feature).
        global_pool: None or "token"; the model always reads its class token."""
        if global_pool not in (None, "token"):
            raise ValueError(f"{type(self).__name__} reads its class token; global_pool={global_pool!r} is not "
                             f"supported (use None or 'token')")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        weight = self.norm_f.weight
        self.head = nn.Identity()
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.cfg.num_classes = num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Input batch -> tokens (batch, layout.length, D)."""
        raise NotImplementedError

    def set_scan_impl(self, impl: str) -> "MambaClassifier":
        """Choose the selective-scan implementation of every mixer: one of mambamerge.ops.MIXER_IMPLS (see
        mambamerge.ops and MambaMixer)."""
        if impl not in MIXER_IMPLS:
            raise ValueError(f"unknown scan impl {impl!r}; valid: {', '.join(MIXER_IMPLS)}")
        for block in self.layers:
            block.mixer.scan_impl = impl
        return self

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Last add + RMSNorm. (batch, L, D) x2 -> (batch, L, D)."""
        return self.norm_f(residual + self.drop_path(hidden))

    def _blocks(self, x: torch.Tensor) -> BlockOutput:
        return run_blocks(self.layers, self.embed(x), self.layout, self.token_reducer)

    def _tokens(self, x: torch.Tensor):
        """Input batch -> (normalised tokens after the last block (batch, L, D), where the class token is:
        an int, or (batch,) once tokens were reduced)."""
        out = self._blocks(x)
        return self.final_norm(out.hidden, out.residual), out.cls_index

    def token_state(self, x: torch.Tensor) -> TokenState:
        """What the blocks did to the tokens of input batch x: their final bookkeeping (sizes (B, L),
        original positions, the class token's index (B,), and the source map (B, L, L0) when patched
        with track_source=True); a dense model's is the embedded tokens' own."""
        out = self._blocks(x)
        if out.state is not None:
            return out.state
        return TokenState.start(out.hidden, self.layout).with_streams(out.hidden, out.residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward_features: input batch -> the normalised tokens after the last block (batch, L, D),
        L the tokens left when the model reduces them. A token-reducing (patched) model puts each image's
        class token first, the others after it in order, since merging leaves it anywhere; forward_head
        reads it there."""
        tokens, cls_index = self._tokens(x)
        return tokens if self.token_reducer is None else class_token_first(tokens, cls_index)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     cls_index: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
        """timm's forward_head: tokens (batch, L, D) from forward_features -> the class-token feature
        (batch, D) when pre_logits (the official Vim's pooled feature), else logits (batch, num_classes).
        cls_index: the class token's index (an int, or (batch,)); by default where forward_features puts
        it (the layout's index, or 0 on a token-reducing model)."""
        if cls_index is None:
            cls_index = self.layout.cls_index if self.token_reducer is None else 0
        feature = self.head_drop(class_feature(x, cls_index))
        return feature if pre_logits else self.head(feature)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input batch -> the normalised class-token feature (batch, D): what the head reads, and what the
        official Vim's forward_features returns."""
        return class_feature(*self._tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, cls_index = self._tokens(x)
        return self.forward_head(tokens, cls_index=cls_index)
