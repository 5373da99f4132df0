"""The sgemm_ of the BLAS torch is linked with (MKL in torch's x86 wheels), which the whole-mixer kernel
runs its projections on: found by address in torch's own library, checked on one small product."""
import ctypes
import functools
import os
from typing import Optional

import torch

_INT_P, _FLOAT_P = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_float)


def _trial(sgemm) -> bool:
    """sgemm_ computes a 2x3 times 3x2 product (column-major) right."""
    a = (ctypes.c_float * 6)(1, 2, 3, 4, 5, 6)  # 2x3: columns (1, 2), (3, 4), (5, 6)
    b = (ctypes.c_float * 6)(1, 0, 2, 0, 1, 1)  # 3x2: columns (1, 0, 2), (0, 1, 1)
    c = (ctypes.c_float * 4)()
    two, three = ctypes.c_int(2), ctypes.c_int(3)
    one, zero = ctypes.c_float(1), ctypes.c_float(0)
    sgemm(b"N", b"N", ctypes.byref(two), ctypes.byref(two), ctypes.byref(three), ctypes.byref(one), a,
          ctypes.byref(two), b, ctypes.byref(three), ctypes.byref(zero), c, ctypes.byref(two))
    return list(c) == [11.0, 14.0, 8.0, 10.0]


@functools.lru_cache(maxsize=None)
def sgemm_address() -> Optional[int]:
    """Address of sgemm_ in torch's CPU library, or None when it does not export one that works."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(path).sgemm_
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, _INT_P, _INT_P, _INT_P, _FLOAT_P, _FLOAT_P, _INT_P, _FLOAT_P,
                   _INT_P, _FLOAT_P, _FLOAT_P, _INT_P]
    fn.restype = None
    return ctypes.cast(fn, ctypes.c_void_p).value if _trial(fn) else None
