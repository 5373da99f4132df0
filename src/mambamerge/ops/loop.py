"""Pure-PyTorch selective scan for CPUs without a compiler: a fused loop over time.

The inputs are moved to time-major layout (L, batch, ...) in scan order, so every
step works on contiguous slices; exp(delta A) is computed one step at a time
into a small buffer that stays in cache. The backward is written by hand (one reverse loop, the rest batched),
so autograd records one node instead of L steps.
"""
import torch
from torch.autograd.function import once_differentiable


def _time_major(x, reverse):
    """(batch, L, ...) -> contiguous (L, batch, ...) in scan order."""
    x = x.transpose(0, 1)
    return (x.flip(0) if reverse else x).contiguous()


def _batch_major(x, reverse):
    """Inverse of _time_major."""
    x = x.flip(0) if reverse else x
    return x.transpose(0, 1).contiguous()


def _scan(u, delta, A, B, C, D, keep_states):
    """Forward recurrence in time-major layout.

    Args:
        u, delta: (L, batch, d); A: (d, N); B, C: (L, batch, N); D: (d,).
        keep_states: also return the state after every step (for the backward);
            otherwise the state is updated in place.

    Returns:
        y: (L, batch, d); states: (L, batch, d, N) or None.
    """
    length, batch, d = u.shape
    drive = delta * u  # (L, batch, d)
    decay = u.new_empty(batch, d, A.shape[1])  # exp(delta_s A), one step at a time (cache sized)
    y = torch.empty_like(u)
    states = u.new_empty(length, batch, d, A.shape[1]) if keep_states else None
    h = u.new_zeros(batch, d, A.shape[1])
    for s in range(length):
        torch.mul(delta[s, :, :, None], A, out=decay).exp_()
        h = torch.mul(decay, h, out=states[s]) if keep_states else h.mul_(decay)
        h.addcmul_(drive[s, :, :, None], B[s, :, None, :])
        torch.bmm(h, C[s, :, :, None], out=y[s, :, :, None])
    return y.addcmul_(u, D), states


def _scan_backward(u, delta, A, B, C, D, states, dy):
    """Gradients of _scan's y for all six inputs, time-major like _scan."""
    length = u.shape[0]
    decay, x, x_a = (torch.empty_like(states[0]) for _ in range(3))  # (batch, d, N) each
    # adjoint of the states: g_s = C_s dy_s + exp(delta_{s+1} A) g_{s+1}
    g = torch.empty_like(states)
    ddelta = torch.zeros_like(u)
    dA = torch.zeros_like(A)
    torch.mul(dy[-1, :, :, None], C[-1, :, None, :], out=g[-1])
    for s in range(length - 1, 0, -1):
        torch.mul(delta[s, :, :, None], A, out=decay).exp_()
        # x_s = g_s exp(delta_s A) h_{s-1}; zero for s = 0, where h_{-1} = 0
        torch.mul(g[s], decay, out=x).mul_(states[s - 1])
        torch.sum(torch.mul(x, A, out=x_a), dim=-1, out=ddelta[s])
        dA += x.mul_(delta[s, :, :, None]).sum(0)
        torch.mul(decay, g[s], out=g[s - 1]).addcmul_(dy[s - 1, :, :, None], C[s - 1, :, None, :])
    g_b = torch.einsum("lbdn,lbn->lbd", g, B)
    ddelta.addcmul_(g_b, u)
    du = g_b * delta + dy * D
    dB = torch.einsum("lbdn,lbd->lbn", g, delta * u)
    dC = torch.einsum("lbd,lbdn->lbn", dy, states)
    dD = (dy * u).sum((0, 1))
    return du, ddelta, dA, dB, dC, dD


class _LoopScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, reverse, keep_states):
        u, delta, B, C = (_time_major(x, reverse) for x in (u, delta, B, C))
        y, states = _scan(u, delta, A, B, C, D, keep_states)
        if keep_states:
            ctx.save_for_backward(u, delta, A, B, C, D, states)
        ctx.reverse = reverse
        return _batch_major(y, reverse)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        reverse = ctx.reverse
        grads = _scan_backward(*ctx.saved_tensors, _time_major(dy, reverse))
        du, ddelta, dA, dB, dC, dD = grads
        du, ddelta, dB, dC = (_batch_major(x, reverse) for x in (du, ddelta, dB, dC))
        return du, ddelta, dA, dB, dC, dD, None, None


def selective_scan_loop(u, delta, A, B, C, D, reverse=False):
    """Selective scan as a fused loop over time; differentiable in all six inputs.

    Args:
        u, delta: (batch, L, d); A: (d, N); B, C: (batch, L, N); D: (d,), one
            floating dtype and device.
        reverse: scan from the last token to the first.

    Returns:
        y: (batch, L, d), as selective_scan_reference.
    """
    inputs = (u, delta, A, B, C, D)
    keep_states = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return _LoopScan.apply(*inputs, bool(reverse), keep_states)
