"""dtype conversions that cost nothing when there is nothing to convert: torch records `.to` and
`promote_types` as operations even when they return their input (tens of them a block)."""
import torch


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`: t itself when it already is (as t.to(dtype), without the call)."""
    return t if t.dtype == dtype else t.to(dtype)


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """torch.promote_types(dtype, torch.float32), without the call for float32 and float64."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.promote_types(dtype, torch.float32)
