"""The kernel library, built and loaded once per process: its ctypes binding, declared from one table of
the entry points of kernels.cpp, and whether (or why not) it is available."""
import ctypes
import platform
import shutil
import sys
import threading
import warnings
from typing import NamedTuple, Optional

import torch

from mambamerge.ops.cpu_kernels import openmp
from mambamerge.ops.cpu_kernels.build import build_library

CXX = "g++"
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}  # the dtypes the kernels take, as named in kernels.cpp

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class EntryPoint(NamedTuple):
    """An exported function of kernels.cpp: its arguments (pointers, then sizes, then flags) and whether it is
    defined per dtype (as <name>_f32 and <name>_f64), taking the thread count and the OpenMP launcher last.
    Every entry point returns an int status, 0 on success."""

    args: tuple
    per_dtype: bool = True


ENTRY_POINTS = {
    "mm_scan_forward": EntryPoint((_P,) * 7 + (_I64,) * 4 + (_INT,)),
    "mm_scan_backward": EntryPoint((_P,) * 13 + (_I64,) * 4 + (_INT,)),
    "mm_softplus": EntryPoint((_P,) * 3 + (_I64,) * 2),
    "mm_conv_silu": EntryPoint((_P,) * 4 + (_I64,) * 5 + (_INT,)),
    "mm_gate": EntryPoint((_P,) * 4 + (_I64,) * 3 + (_INT,)),
    "mm_merge_apply": EntryPoint((_P,) * 10 + (_I64,) * 5 + (_INT,)),
    "mm_plan_from_selection": EntryPoint((_P,) * 4 + (_I64,) * 3, per_dtype=False),
    # features, class index, score, src, dst, gemm_; batch, L, D, protected width, match reach, r; least
    "mm_select_mame": EntryPoint((_P,) * 6 + (_I64,) * 6 + (_INT,)),
    # features, protected, penalty, src, dst, gemm_; batch, L, D, r
    "mm_select_bipartite": EntryPoint((_P,) * 6 + (_I64,) * 4),
    # features, class index, src, dst; batch, L, D, w_protect, r; fading, gamma
    "mm_select_adjacent": EntryPoint((_P,) * 4 + (_I64,) * 5 + (ctypes.c_double,) * 2),
    # problem, norm eps, sgemm_, bf16 gemm (or null: float32 products), threads, launcher
    "mm_mixer_forward": EntryPoint((_P, ctypes.c_double, _P, _P, _INT, _P), per_dtype=False),
}
_THREADING_ARGS = (_INT, _P)  # num_threads, launcher


class Loaded(NamedTuple):
    """The outcome of the process's one attempt to build and load the library: the library (None when it
    is unavailable, `error` says why) and the address of the OpenMP launcher its tasks run on (None:
    std::thread workers)."""

    lib: Optional[ctypes.CDLL]
    launcher: Optional[int]
    error: Optional[str]


class _Unsupported(RuntimeError):
    """A machine the kernels are not built for: the torch path is expected there, no warning."""


def _bind(lib: ctypes.CDLL) -> None:
    for name, entry in ENTRY_POINTS.items():
        symbols = [f"{name}_{suffix}" for suffix in SUFFIX.values()] if entry.per_dtype else [name]
        for symbol in symbols:
            fn = getattr(lib, symbol)
            fn.argtypes = list(entry.args + _THREADING_ARGS) if entry.per_dtype else list(entry.args)
            fn.restype = _INT


def _trial(lib: ctypes.CDLL) -> None:
    """One tiny call checked against torch before the library is trusted with real work."""
    x = torch.linspace(-30.0, 30.0, 7)
    y = torch.empty_like(x)
    if lib.mm_softplus_f32(x.data_ptr(), y.data_ptr(), None, 1, 7, 1, None) != 0 or not torch.allclose(
            y, torch.nn.functional.softplus(x), rtol=1e-5, atol=1e-6):
        raise RuntimeError("the compiled library gives wrong results on a trial call; using torch")


def _load() -> ctypes.CDLL:
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        raise _Unsupported(f"the compiled kernel targets Linux x86_64, not {sys.platform} {platform.machine()}")
    cxx = shutil.which(CXX)
    if cxx is None:
        raise _Unsupported(f"no C++ compiler ({CXX}) on PATH")
    lib = ctypes.CDLL(str(build_library(cxx)))
    _bind(lib)
    _trial(lib)
    return lib


def _attempt() -> Loaded:
    try:
        return Loaded(_load(), openmp.launcher(), None)
    except _Unsupported as exc:
        return Loaded(None, None, str(exc))
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"compiled CPU kernels unavailable, using the slower torch path: {exc}", stacklevel=4)
        return Loaded(None, None, str(exc))


_lock = threading.Lock()
_loaded: Optional[Loaded] = None


def loaded() -> Loaded:
    """The library, built and loaded on the first call; the lock is only taken until that attempt has finished."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _attempt()
    return _loaded


@torch.compiler.assume_constant_result
def available() -> bool:
    """True if the kernels are built (building them on the first call) and loaded. A constant for
    torch.compile, which calls it once while tracing."""
    return loaded().lib is not None


def handles(x: torch.Tensor) -> bool:
    """True if the kernels can take x: a CPU float32/float64 tensor, with the library built and loaded."""
    return x.device.type == "cpu" and x.dtype in SUFFIX and available()


def unavailable_reason() -> Optional[str]:
    """Why the kernels cannot be used (a string), or None if they can."""
    return loaded().error


def address(t: Optional[torch.Tensor]) -> int:
    """A tensor's data address for a kernel argument, 0 (a null pointer) for None."""
    return 0 if t is None else t.data_ptr()


def call(name: str, dtype: Optional[torch.dtype], *args) -> int:
    """Runs entry point `name` (of ENTRY_POINTS; its `dtype` version when it has one per dtype, with the
    thread count and the OpenMP launcher added) on args; returns its status."""
    state = loaded()
    if dtype is None:
        return getattr(state.lib, name)(*args)
    return getattr(state.lib, f"{name}_{SUFFIX[dtype]}")(*args, torch.get_num_threads(), state.launcher)
