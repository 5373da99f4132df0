"""The gemm_ of the BLAS torch is linked with (MKL in torch's x86 wheels), which the whole-mixer kernel runs
its projections on and the selection kernels their similarities, and MKL's bf16 gemm (bf16 matrices,
float32 product) for the mixer under bf16 autocast: found by address in torch's own library, checked on
one small product."""
import ctypes
import functools
import os
import struct
from typing import Optional

import torch

_SYMBOLS = {torch.float32: ("sgemm_", ctypes.c_float), torch.float64: ("dgemm_", ctypes.c_double)}
_BF16_SYMBOL = "gemm_bf16bf16f32_"


def _bf16_bits(value: float) -> int:
    """bf16's bit pattern of a float32 that bf16 holds exactly (its upper 16 bits)."""
    return struct.unpack("<I", struct.pack("<f", value))[0] >> 16


def _trial(gemm, scalar, element) -> bool:
    """gemm_ computes a 2x3 times 3x2 product (column-major) right, its matrices of ctypes type `element`
    (c_uint16: bf16 bit patterns) and alpha, beta and product of `scalar`."""
    encode = _bf16_bits if element is ctypes.c_uint16 else (lambda v: v)
    a = (element * 6)(*map(encode, (1, 2, 3, 4, 5, 6)))  # 2x3: columns (1, 2), (3, 4), (5, 6)
    b = (element * 6)(*map(encode, (1, 0, 2, 0, 1, 1)))  # 3x2: columns (1, 0, 2), (0, 1, 1)
    c = (scalar * 4)()
    two, three = ctypes.c_int(2), ctypes.c_int(3)
    one, zero = scalar(1), scalar(0)
    gemm(b"N", b"N", ctypes.byref(two), ctypes.byref(two), ctypes.byref(three), ctypes.byref(one), a,
         ctypes.byref(two), b, ctypes.byref(three), ctypes.byref(zero), c, ctypes.byref(two))
    return list(c) == [11.0, 14.0, 8.0, 10.0]


def _checked(symbol: str, scalar, element) -> Optional[int]:
    """Address of torch's exported gemm_ `symbol`, or None when there is none or it fails _trial."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = getattr(ctypes.CDLL(path), symbol)
    except (OSError, AttributeError):
        return None
    int_p, scalar_p, element_p = (ctypes.POINTER(t) for t in (ctypes.c_int, scalar, element))
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, int_p, int_p, int_p, scalar_p, element_p, int_p, element_p,
                   int_p, scalar_p, scalar_p, int_p]
    fn.restype = None
    return ctypes.cast(fn, ctypes.c_void_p).value if _trial(fn, scalar, element) else None


@functools.lru_cache(maxsize=None)
def gemm_address(dtype: torch.dtype = torch.float32) -> Optional[int]:
    """Address of sgemm_ (float32) or dgemm_ (float64) in torch's CPU library, or None when it does not
    export one that works."""
    if dtype not in _SYMBOLS:
        return None
    symbol, scalar = _SYMBOLS[dtype]
    return _checked(symbol, scalar, scalar)


@functools.lru_cache(maxsize=None)
def bf16_gemm_address() -> Optional[int]:
    """Address of MKL's gemm_bf16bf16f32_ in torch's CPU library, or None when it does not export one that works."""
    return _checked(_BF16_SYMBOL, ctypes.c_float, ctypes.c_uint16)


@torch.compiler.assume_constant_result
def gemm_found(dtype: torch.dtype = torch.float32) -> bool:
    """torch exports a working gemm_ for dtype. A constant for torch.compile, which calls it once while tracing."""
    return gemm_address(dtype) is not None


@torch.compiler.assume_constant_result
def bf16_gemm_found() -> bool:
    """torch exports a working bf16 gemm (bf16_gemm_address). A constant for torch.compile."""
    return bf16_gemm_address() is not None
