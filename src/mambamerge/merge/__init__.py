"""Token reduction between blocks: shared bookkeeping (state.py), the schedule, and one module per method."""
from mambamerge.merge.mame import MaMe
from mambamerge.merge.mtr import MTR
from mambamerge.merge.pruning import EViT, RandomPrune, ToP
from mambamerge.merge.stm import STM
from mambamerge.merge.tome import RMeeTo, ToMe, ToMeUnordered

METHODS = {cls.name: cls for cls in (MaMe, MTR, STM, ToMe, ToMeUnordered, RMeeTo, ToP, EViT, RandomPrune)}

__all__ = ["METHODS", "MaMe", "MTR", "STM", "ToMe", "ToMeUnordered", "RMeeTo", "ToP", "EViT", "RandomPrune"]
