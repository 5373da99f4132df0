"""The selective scan as a matrix: its implicit ("hidden") attention.

A scan with zero initial state is linear in its input u for fixed Δ, B, C, so each direction's output
is y_t = sum_s alpha_{t,s} u_s + D u_t with, for the forward scan (s <= t),

    alpha_{t,s}[d] = sum_n C_t[n] exp(A[d, n] (cumΔ_t[d] - cumΔ_s[d])) Δ_s[d] B_s[n],

cumΔ the running sum of Δ over the sequence (the product of the step decays exp(Δ_j A) for
j = s+1..t). The backward scan is the forward one on the reversed sequence (s >= t).
"""
import torch

from mambamerge.models.mixer import ScanInputs


def implicit_attention(scan: ScanInputs) -> torch.Tensor:
    """alpha of one direction: (B, d_inner, L, L), row t = output position, column s = input token;
    zero where the direction cannot see (s > t forward, s < t backward). Compute in float64 for exact
    checks. Memory: B * d_inner * L^2 values (plus one such temporary)."""
    if scan.reverse:
        flipped = ScanInputs(scan.u.flip(1), scan.delta.flip(1), scan.A, scan.B.flip(1), scan.C.flip(1), scan.D,
                             False)
        return implicit_attention(flipped).flip(-1, -2)
    delta = scan.delta.transpose(1, 2)  # (B, d, L)
    cum = delta.cumsum(-1)
    length = delta.shape[-1]
    gap = cum[..., :, None] - cum[..., None, :]  # (B, d, t, s)
    future = torch.ones(length, length, dtype=torch.bool, device=delta.device).triu(1)
    gap = gap.masked_fill(future, float("inf"))  # exp(A * inf) = 0 with A < 0
    alpha = torch.zeros_like(gap)
    for n in range(scan.A.shape[1]):
        decay = torch.exp(scan.A[None, :, None, None, n] * gap)
        alpha += decay * scan.C[:, None, :, None, n] * (delta * scan.B[:, None, :, n])[:, :, None, :]
    return alpha


def apply_attention(alpha: torch.Tensor, scan: ScanInputs) -> torch.Tensor:
    """The scan's output from its attention: y_t = sum_s alpha_{t,s} u_s + D u_t.
    alpha (B, d, L, L) -> (B, L, d)."""
    return torch.einsum("bdts,bsd->btd", alpha, scan.u) + scan.D * scan.u


def class_token_attention(alpha: torch.Tensor, cls_index: int) -> torch.Tensor:
    """How much of each input token reaches the class token's output: |alpha_{cls,s}| averaged over
    channels. (B, d, L, L) -> (B, L)."""
    return alpha[:, :, cls_index].abs().mean(1)
