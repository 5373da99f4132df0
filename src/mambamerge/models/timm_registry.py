"""Registers every model with timm, under its short name and (Vim) the official long name, each with its
pretrained_cfg, so that once mambamerge is imported

    timm.create_model("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")
    timm.create_model("vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file="vim_t_midclstok_76p1acc.pth"))

build a model, the second loading an official (or our safetensors) file through mambamerge.load_checkpoint.
Nothing is downloaded. A name another package has already registered with timm is left to it (no
overwrite, no warning); mambamerge.create_model still builds ours.
"""
import dataclasses

from timm.models import PretrainedCfg, generate_default_cfgs, is_model, register_model, resolve_pretrained_cfg

from mambamerge.models.registry import FAMILIES, MODEL_CONFIGS, OFFICIAL_NAMES, create_model, pretrained_cfg_of

# options timm.create_model passes to every entrypoint, read here rather than by the config
_TIMM_ONLY_KWARGS = ("cache_dir",)
# config fields that hold no tensors: a model loaded from a file is rebuilt with them
_RUNTIME_FIELDS = ("drop_rate", "drop_path_rate", "head_drop_rate")
# input sizes the loader takes (it interpolates the position embeddings)
_LOAD_OPTIONS = ("img_size", "num_frames", "spec_size")
# config fields a file does not fix: the input size, the classes
_FREE_FIELDS = _LOAD_OPTIONS + ("num_classes",)

# read by timm's register_model: each name's pretrained_cfg
_NAMES = list(MODEL_CONFIGS) + list(OFFICIAL_NAMES)
default_cfgs = generate_default_cfgs({name: pretrained_cfg_of(name) for name in _NAMES})


def _check_architecture(name: str, family: str, config: dict, model) -> None:
    """The loaded model must be the architecture `name` (family and config) describes, its size aside."""
    named = FAMILIES[family].config_class(**config)
    differs = {f.name: (getattr(model.cfg, f.name), getattr(named, f.name)) for f in dataclasses.fields(named)
               if f.name not in _FREE_FIELDS + _RUNTIME_FIELDS
               and getattr(model.cfg, f.name) != getattr(named, f.name)}
    if differs:
        listed = ", ".join(f"{k}={found!r} (not {want!r})" for k, (found, want) in differs.items())
        raise ValueError(f"the file does not hold a {name}: {listed}; create the model whose name matches the file")


def _load(name: str, file: str, kwargs: dict):
    """The model in `file` (mambamerge.load_checkpoint), with timm's options applied: the input size ones
    go to the loader (position embeddings interpolated), num_classes replaces the head when it differs,
    dropout and stochastic-depth rates rebuild the model around the same weights."""
    from mambamerge.checkpoint import load_checkpoint

    load_options = {k: kwargs.pop(k) for k in list(kwargs) if k in _LOAD_OPTIONS}
    num_classes = kwargs.pop("num_classes", None)
    runtime = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUNTIME_FIELDS}
    if kwargs:
        accepted = ", ".join(("num_classes",) + _RUNTIME_FIELDS + _LOAD_OPTIONS)
        raise ValueError(f"{name} with pretrained=True takes its architecture from the file; unsupported option(s): "
                         f"{', '.join(sorted(kwargs))} (accepted: {accepted})")
    family, config = MODEL_CONFIGS[OFFICIAL_NAMES.get(name, name)]
    model = load_checkpoint(file, family=family, **load_options)
    _check_architecture(name, family, config, model)
    runtime = {k: v for k, v in runtime.items() if hasattr(model.cfg, k) and getattr(model.cfg, k) != v}
    if runtime:
        rebuilt = type(model)(dataclasses.replace(model.cfg, **runtime))
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def _given(pretrained_cfg) -> dict:
    """The fields of a pretrained_cfg the caller passed to timm.create_model (a dict or a PretrainedCfg;
    a tag string gives none)."""
    if isinstance(pretrained_cfg, PretrainedCfg):
        return pretrained_cfg.to_dict()
    return dict(pretrained_cfg) if isinstance(pretrained_cfg, dict) else {}


def _entrypoint(name: str):
    def build(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg,
                                     pretrained_cfg_overlay=pretrained_cfg_overlay).to_dict()
        if pretrained:
            if not cfg.get("file"):
                raise ValueError(f"{name}: there are no weights to download; pass a local checkpoint file with "
                                 f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))"
                                 f" or use mambamerge.load_checkpoint(PATH)")
            model = _load(name, cfg["file"], kwargs)
        else:
            model = create_model(name, **kwargs)
        # timm's fields, then the model's own (its input, its refinements), then what the caller gave
        model.pretrained_cfg = {**cfg, **model.pretrained_cfg, **_given(pretrained_cfg),
                                **(pretrained_cfg_overlay or {})}
        return model

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"mambamerge {name}: pretrained=True loads pretrained_cfg_overlay=dict(file=...)"
    return build


for _name in _NAMES:
    if not is_model(_name):  # registered already: by this module (a re-import) or by another package
        register_model(_entrypoint(_name))
