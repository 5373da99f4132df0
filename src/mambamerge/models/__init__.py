"""Model families: Vim (images). Shared blocks in blocks.py."""
from mambamerge.models.blocks import Block, BiMambaMixer, RMSNorm, SSMStats
from mambamerge.models.registry import OFFICIAL_NAMES, create_model, list_models
from mambamerge.models.vim import VimConfig, VisionMamba, interpolate_pos_embed

__all__ = ["Block", "BiMambaMixer", "RMSNorm", "SSMStats", "OFFICIAL_NAMES", "create_model", "list_models",
           "VimConfig", "VisionMamba", "interpolate_pos_embed"]
