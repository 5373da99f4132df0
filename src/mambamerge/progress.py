"""Progress bars only where someone watches them: on a terminal, in the first process. Written to a log
file (or from the other torchrun processes) they are switched off, so logs hold no escape codes."""
import sys

from tqdm import tqdm

from mambamerge.distributed import world


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), disabled unless stderr is a terminal and this is the main process
    (kwargs["disable"]=True disables it in any case)."""
    hidden = kwargs.pop("disable", False)
    shown = sys.stderr.isatty() and world().is_main and not hidden
    return tqdm(iterable, disable=not shown, leave=kwargs.pop("leave", False), **kwargs)
