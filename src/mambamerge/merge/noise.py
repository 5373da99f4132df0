"""Reproducible random draws that torch.compile captures: a counter-based integer hash instead of a
torch.Generator (dynamo cannot trace a generator argument, so every random method broke the graph).

Draw k of a `Draws(seed)` gives each (image, token) cell the hash of (seed, k, image, token): the same
seed and the same sequence of draws give the same numbers, eager or compiled, on any device. The
counter is a tensor advanced in place, so a compiled graph advances it too without a recompile; it moves
to the device of the draws on the first one there.
"""
from typing import Tuple

import torch

_MASK = 0x7FFFFFFF  # values stay below 2**31, so a product with a 31-bit constant fits int64
_MIX = (0x2C1B3C6D, 0x297A2D39, 0x1B873593)


def hash31(x: torch.Tensor) -> torch.Tensor:
    """An avalanche hash of 31-bit integers (int64 tensor of values in [0, 2**31)), elementwise: xor-shift
    and multiply rounds, every product taken modulo 2**31."""
    for constant in _MIX:
        x = ((x ^ (x >> 15)) * constant) & _MASK
    return x ^ (x >> 16)


class Draws:
    """Uniform [0, 1) noise from a seed, one call after the other."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.count = torch.zeros((), dtype=torch.long)

    def uniform(self, shape: Tuple[int, int], device: torch.device) -> torch.Tensor:
        """(B, L) float32 in [0, 1) (multiples of 2**-24), different at every cell and every call."""
        batch, length = shape
        if self.count.device != device:  # once: the counter then lives where the draws are made, so a
            self.count = self.count.to(device)  # draw copies nothing from the host (no sync, graph-capturable)
        call = self.count.add_(1)
        rows = torch.arange(batch, device=device)[:, None]
        cols = torch.arange(length, device=device)[None, :]
        key = hash31((hash31(call + (self.seed & _MASK)) + rows * 0x3504F333) & _MASK)
        bits = hash31((key + cols * 0x5BD1E995) & _MASK)
        return (bits >> 7).float() * 2.0 ** -24
