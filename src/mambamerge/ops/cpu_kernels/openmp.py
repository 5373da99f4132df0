"""The OpenMP runtime torch runs its ops on, which the kernels borrow for their tasks."""
import ctypes
import os
import re
from typing import Optional

import torch

_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)([-.].*)?\.so[.0-9]*$")


def launcher() -> Optional[int]:
    """Address of GOMP_parallel in the OpenMP runtime torch runs its ops on, or None.

    The kernels run their tasks on that runtime's team when they can: right after a torch op its
    workers spin waiting for work, so threads of our own would compete with them for the cores. None
    (the kernels start std::thread workers) when torch is not built with OpenMP or the runtime among the
    process's loaded libraries (/proc/self/maps) is ambiguous.
    """
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    with open("/proc/self/maps") as f:
        loaded = {line.split()[-1] for line in f if _RUNTIME.search(line.strip())}
    torch_dir = os.path.dirname(torch.__file__)
    # the one shipped with torch (torch/lib or torch.libs) first
    candidates = [p for p in loaded if p.startswith(torch_dir)] or list(loaded)
    if len(candidates) != 1:
        return None
    try:
        return ctypes.cast(ctypes.CDLL(candidates[0]).GOMP_parallel, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
