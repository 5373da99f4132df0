"""Reading checkpoints of each model family from their tensors: which family a state dict is, and the
config and (position-embedding adapted) weights to build it with. Vim's inference lives in
checkpoint.py; each further family has a module here with `matches(state_dict)` and
`config_and_weights(state_dict, saved_config, **options)`, raising ValueError with the reason."""
from typing import Dict

from mambamerge.loaders import aum, videomamba

# family -> loader module; Vim is the fallback (checkpoint.py)
LOADERS = {videomamba.FAMILY: videomamba, aum.FAMILY: aum}

FAMILY_NAMES: Dict[str, str] = {"vim": "Vision Mamba (Vim)", videomamba.FAMILY: "VideoMamba",
                                aum.FAMILY: "Audio Mamba (AuM)"}


def detect_family(state_dict) -> str:
    """The family whose official keys the state dict has ("vim" when no other family's match)."""
    return next((family for family, loader in LOADERS.items() if loader.matches(state_dict)), "vim")
