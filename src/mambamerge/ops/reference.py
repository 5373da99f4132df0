"""Slow, obviously-correct selective scan used as the ground truth in tests.

A plain Python loop over time, no tricks, any floating dtype (float64 for tight checks).
Gradients come from autograd through the loop.
"""
import torch


def selective_scan_reference(u, delta, A, B, C, D, reverse=False):
    """Selective scan of one direction.

    Args:
        u:     (batch, L, d) input sequence.
        delta: (batch, L, d) step size, already through bias and softplus.
        A:     (d, N) state matrix (negative real, diagonal per channel).
        B:     (batch, L, N) input projection per step.
        C:     (batch, L, N) output projection per step.
        D:     (d,) skip connection.
        reverse: scan from the last token to the first (the backward branch of a
            bidirectional mixer), output still in sequence order.

    Returns:
        y: (batch, L, d) with h_t = exp(delta_t A) h_prev + delta_t B_t u_t and
        y_t = <h_t, C_t> + D u_t, where h_prev is the state of the previous step
        in scan order.
    """
    batch, length, d = u.shape
    h = u.new_zeros(batch, d, A.shape[1])
    ys = [None] * length
    steps = range(length - 1, -1, -1) if reverse else range(length)
    for t in steps:
        dt = delta[:, t, :, None]
        h = torch.exp(dt * A) * h + dt * B[:, t, None, :] * u[:, t, :, None]
        ys[t] = (h * C[:, t, None, :]).sum(-1) + D * u[:, t]
    return torch.stack(ys, dim=1)
