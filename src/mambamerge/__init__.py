"""mambamerge: token merging for vision State Space Models, in pure PyTorch."""
from mambamerge.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from mambamerge.models import (AudioMamba, AuMConfig, VideoMamba, VideoMambaConfig, VimConfig, VisionMamba,
                               create_model, list_models)
from mambamerge.models import timm_registry  # noqa: F401  (registers the models with timm)
from mambamerge.flops import FlopsReport, flops
from mambamerge.merge.recipe import MergeRecipe
from mambamerge.patch import patch, reduction_summary, unpatch
from mambamerge.tokens import TokenLayout

__version__ = "0.1.0"
__all__ = ["FlopsReport", "flops", "MergeRecipe", "CheckpointError", "load_checkpoint", "read_checkpoint", "save_checkpoint",
           "AudioMamba", "AuMConfig", "VideoMamba", "VideoMambaConfig", "VimConfig", "VisionMamba", "TokenLayout",
           "create_model", "list_models", "patch", "reduction_summary", "unpatch", "__version__"]
