"""mambamerge: token merging for vision State Space Models, in pure PyTorch.

The names below load on first use (PEP 562), so that `import mambamerge` costs nothing until one is used:
the command line parses its arguments (and answers `--help`) before torch is imported. The models are
registered with timm as soon as both mambamerge and timm are imported, in either order."""
import importlib
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "mambamerge.checkpoint": ("CheckpointError", "load_checkpoint", "read_checkpoint", "save_checkpoint"),
    "mambamerge.models": ("AudioMamba", "AuMConfig", "VideoMamba", "VideoMambaConfig", "VimConfig", "VisionMamba",
                          "create_model", "list_models"),
    "mambamerge.compiling": ("compile",),
    "mambamerge.flops": ("FlopsReport", "flops"),
    "mambamerge.merge.recipe": ("MergeRecipe",),
    "mambamerge.patch": ("patch", "reduction_summary", "unpatch"),
    "mambamerge.tokens": ("TokenLayout",),
    "mambamerge.tune": ("TuneResult", "reference_logits", "tune"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [*_HOME, "__version__"]


def __getattr__(name: str):
    """An exported name, or a submodule (`mambamerge.models`), imported on first access."""
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type: importing the submodule `patch` (or `flops`) binds the function of that
    name, as `from mambamerge.patch import patch` in an eager __init__ would, not the submodule."""

    def __setattr__(self, name, value):
        if name in _HOME and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _importing_mambamerge() -> bool:
    """Whether a mambamerge module is still executing its import (importlib marks its spec meanwhile)."""
    return any(name.partition(".")[0] == __name__ and getattr(getattr(module, "__spec__", None), "_initializing", False)
               for name, module in list(sys.modules.items()))


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Imports mambamerge.models (which registers the models with timm) right after timm itself is
    imported, so that `timm.create_model("vim_tiny")` works once both are imported, without importing
    torch earlier. When one of mambamerge's own modules is what imports timm, that import is left to
    finish: the models register when mambamerge.models is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        run_timm = spec.loader.exec_module

        def exec_module(module):
            run_timm(module)
            if not _importing_mambamerge():
                importlib.import_module("mambamerge.models")

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    importlib.import_module("mambamerge.models")
else:
    sys.meta_path.insert(0, _RegisterWithTimm())
