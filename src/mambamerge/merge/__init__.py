"""Token reduction between blocks: shared bookkeeping (state.py), the schedule, and one module per method."""
from mambamerge.merge.mame import MaMe

METHODS = {cls.name: cls for cls in (MaMe,)}

__all__ = ["METHODS", "MaMe"]
