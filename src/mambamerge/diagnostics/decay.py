"""How fast each scan direction forgets: the decay kernel and its effective length.

The contribution of token s to the state k steps later in scan order is multiplied by
exp(A (Δ_{s+1} + ... + Δ_{s+k})), per channel d and state n. The decay kernel K(k) averages that
factor over images, positions, channels and states; the effective length of a (channel, state) pair is
the first lag at which its own position-averaged factor falls below 1/e.
"""
import math
from typing import Dict

import torch

from mambamerge.models.mixer import ScanInputs


def decay_factors(scan: ScanInputs, max_lag: int) -> torch.Tensor:
    """Position- and image-averaged decay per lag, channel and state: (max_lag + 1, d_inner, N) for lags
    0..max_lag (lag 0 is 1); max_lag < L. The backward direction counts lags in its own scan order."""
    delta = scan.delta.flip(1) if scan.reverse else scan.delta  # (B, L, d) in scan order
    length = delta.shape[1]
    if not 0 <= max_lag < length:
        raise ValueError(f"max_lag must be in [0, {length - 1}] for {length} tokens, got {max_lag}")
    cum = torch.cat((torch.zeros_like(delta[:, :1]), delta.cumsum(1)), dim=1)  # (B, L + 1, d)
    out = [torch.ones_like(scan.A)]
    for k in range(1, max_lag + 1):
        summed = cum[:, k + 1:] - cum[:, 1:length + 1 - k]  # Δ over the k steps after each start: (B, L - k, d)
        out.append(torch.exp(summed[..., None] * scan.A).mean(dim=(0, 1)))
    return torch.stack(out)


def effective_lengths(factors: torch.Tensor) -> torch.Tensor:
    """First lag at which each (channel, state) factor is <= 1/e; inf where it never is within the lags.
    (lags, d, N) -> (d, N) float."""
    below = factors <= math.exp(-1.0)
    first = below.float().argmax(0).float()
    return torch.where(below.any(0), first, torch.full_like(first, float("inf")))


def decay_summary(scan: ScanInputs, max_lag: int) -> Dict[str, object]:
    """The kernel (mean over channels and states, per lag), its own 1/e length, and quartiles of the
    per-(channel, state) effective lengths (inf: longer than max_lag)."""
    factors = decay_factors(scan, max_lag)
    kernel = factors.mean(dim=(1, 2))
    lengths = effective_lengths(factors).flatten()
    below = kernel <= math.exp(-1.0)
    quartiles = torch.quantile(lengths.double().clamp(max=float(max_lag + 1)), torch.tensor([0.25, 0.5, 0.75],
                                                                                           dtype=torch.float64))
    return {"kernel": kernel.tolist(),
            "kernel_length": int(below.float().argmax()) if bool(below.any()) else float("inf"),
            "length_quartiles": [float("inf") if q > max_lag else float(q) for q in quartiles.tolist()],
            "long_memory_fraction": float(torch.isinf(lengths).float().mean())}
