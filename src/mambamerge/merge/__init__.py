"""Token reduction between blocks: the token state (state.py) and merge plan (plan.py), schedules,
and one module per method. Importing a method module registers its methods (registry.py)."""
from mambamerge.merge.mame import MaMe
from mambamerge.merge.mtr import MTR
from mambamerge.merge.pruning import EViT, RandomPrune, ToP
from mambamerge.merge.registry import METHODS, register
from mambamerge.merge.stm import STM
from mambamerge.merge.tome import RMeeTo, ToMe, ToMeUnordered

__all__ = ["METHODS", "register", "MaMe", "MTR", "STM", "ToMe", "ToMeUnordered", "RMeeTo", "ToP", "EViT", "RandomPrune"]
