"""What every model family shares: the stack of blocks, the final norm, the readout and the head.

A family subclasses `MambaClassifier`, builds its embedding and calls `_build_trunk`, and defines
`embed(x)`, `token_layout(input_size)` and `input_shape_for(cfg)`; running the blocks and reducing tokens
between them is `runner.run_blocks`, the same for every family.

The classifier follows timm's model conventions, so timm's data, optimiser and training tools take it
as one of theirs: `pretrained_cfg`, `no_weight_decay`, `forward_features` (the normalised tokens),
`forward_head`, `get_classifier`, `reset_classifier`, `num_features`.
"""
import math
from typing import Optional, Set, Tuple, Union

import torch
from torch import nn

from mambamerge.data.folders import normalisation
from mambamerge.models.blocks import Block, DropPath, RMSNorm
from mambamerge.models.mixer import MambaMixer
from mambamerge.ops import MIXER_IMPLS
from mambamerge.runner import class_feature, run_blocks
from mambamerge.tokens import TokenLayout


def to_2tuple(v: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """An int or a (height, width) pair -> a pair of ints."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class MambaClassifier(nn.Module):
    """embed -> blocks (two streams: hidden, residual; tokens reduced between blocks once patched with
    mambamerge.patch) -> final add + RMSNorm -> feature at the class token -> head.

    Subclasses set `cfg` (a dataclass with embed_dim, depth, num_classes, ...) and `input_kind`, and
    define `embed`, `token_layout` and `input_shape_for`; they may refine `default_pretrained_cfg`.
    """

    cfg = None
    input_kind = None  # what one input sample is: "images" (C, H, W), "clips" (C, T, H, W), "spectrograms" (T, F)
    classes = None  # the class names a checkpoint records (load_checkpoint)
    merge_recipe = None  # the token reduction a fine-tuned checkpoint records (load_checkpoint; a MergeRecipe)
    # leaf names of the embeddings kept out of weight decay (see no_weight_decay)
    no_weight_decay_leaves = ("pos_embed", "cls_token", "temporal_pos_embedding")

    def _build_trunk(self, embed_dim: int, depth: int, num_classes: int, drop_path_rate: float,
                     norm_eps: float, head_drop_rate: float = 0.0, **mixer_kwargs) -> None:
        """Blocks `layers.{i}`, `norm_f`, `head`. The official models give block i the stochastic depth
        rate of block i - 1 of a linear schedule (block 0 none), and the final addition the full rate."""
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        block_rates = [0.0] + rates[:-1]
        self.layers = nn.ModuleList(Block(embed_dim, drop_path=block_rates[i], norm_eps=norm_eps, **mixer_kwargs)
                                    for i in range(depth))
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path_rate)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.token_reducer = None  # set by mambamerge.patch; not part of the state dict

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
        """The layout of the embedded tokens for an input of `input_size` (the family's own form; the
        model's size when None)."""
        raise NotImplementedError

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

    def _tokens(self, x: torch.Tensor):
        """Input batch -> (normalised tokens after the last block (batch, L, D), where the class token is:
        an int, or (batch,) once tokens were reduced)."""
        out = run_blocks(self.layers, self.embed(x), self.layout, self.token_reducer)
        return self.final_norm(out.hidden, out.residual), out.cls_index

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward_features: input batch -> the normalised tokens after the last block (batch, L, D),
        L the tokens left when the model reduces them. forward_head reads the class token among them."""
        return self._tokens(x)[0]

    def _last_cls_index(self, tokens: torch.Tensor) -> Union[int, torch.Tensor]:
        """Where the class token is among the tokens of this model's last forward_features."""
        if self.token_reducer is None:
            return self.layout.cls_index
        state = self.token_reducer.last_state
        if state is None or state.hidden.shape[:2] != tokens.shape[:2]:
            raise ValueError(f"forward_head got tokens of shape {tuple(tokens.shape)}, not those of this "
                             f"token-reducing model's last forward_features call, which tracks each image's class "
                             f"token; pass cls_index= or call forward_features first")
        return state.cls_index

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     cls_index: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
        """timm's forward_head: tokens (batch, L, D) from forward_features -> the class-token feature
        (batch, D) when pre_logits (the official Vim's pooled feature), else logits (batch, num_classes).
        cls_index: the class token's index (an int, or (batch,)); by default where this model's last
        forward_features left it."""
        feature = self.head_drop(class_feature(x, self._last_cls_index(x) if cls_index is None else cls_index))
        return feature if pre_logits else self.head(feature)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input batch -> the normalised class-token feature (batch, D): what the head reads, and what the
        official Vim's forward_features returns."""
        return class_feature(*self._tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, cls_index = self._tokens(x)
        return self.forward_head(tokens, cls_index=cls_index)
