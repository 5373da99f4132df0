"""Model families: Vim (images), VideoMamba (video), Audio Mamba (spectrograms); one module each, listed
in registry.py. Shared block in blocks.py, its mixer in mixer.py, the shared classifier in base.py.
Importing the package registers every model with timm (timm_registry.py)."""
from mambamerge.models.aum import AudioMamba, AuMConfig
from mambamerge.models.base import MambaClassifier
from mambamerge.models.mixer import MambaMixer
from mambamerge.models.blocks import Block, RMSNorm
from mambamerge.models.registry import FAMILIES, OFFICIAL_NAMES, create_model, list_models
from mambamerge.models.videomamba import VideoMamba, VideoMambaConfig
from mambamerge.models.vim import VimConfig, VisionMamba, interpolate_pos_embed
from mambamerge.models import timm_registry  # noqa: F401,E402  (registers the models with timm)

__all__ = ["AudioMamba", "AuMConfig", "Block", "FAMILIES", "MambaClassifier", "MambaMixer", "RMSNorm",
           "OFFICIAL_NAMES", "create_model", "list_models", "VideoMamba", "VideoMambaConfig", "VimConfig",
           "VisionMamba", "interpolate_pos_embed"]
