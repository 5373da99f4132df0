"""Selective scan as Triton kernels, forward and backward: a GPU path with nothing to compile ahead of time.

Channel-major layouts, as the fused mixer path holds its tensors: u, dt, z (batch, d, L); B, C
(batch, N, L); any strides (a (batch, L, d) tensor passes as its transposed view, without a copy).
Inside the kernel, per channel: Δ = softplus(dt + bias) (either part optional), h_t = exp(Δ_t A) h_prev
+ Δ_t B_t u_t, y_t = <h_t, C_t> + D u_t, out_t = y_t SiLU(z_t) (optional). The state lives in float32
registers whatever the input dtype (float32, bfloat16, float16). ``reverse`` scans from the last token to
the first, reading the sequence backwards instead of flipping it. ``report=True`` also returns Δ (float32)
and its mean over channels per token from the same pass, for the merging blocks that need them.

Each program takes one sequence and a block of channels, and walks the sequence in chunks of BLOCK_T
steps: within a chunk the recurrence is an associative scan over (decay, drive) pairs, the state
carried from chunk to chunk. The backward recomputes the chunk's states from the state that entered it
(saved by the forward, one per chunk) and runs the adjoint recurrence the other way.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 when this module
is first imported), which the tests use.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
FORWARD_TILE = 4096  # BLOCK_D * BLOCK_N * BLOCK_T elements per program: bounds its registers
BACKWARD_TILE = 2048


def handles(device) -> bool:
    """True if the kernels run on tensors of `device`: CUDA, or the CPU under the interpreter."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and INTERPRETED)


@triton.jit
def _combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2) in scan order: h -> a2 (a1 h + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow; log1p(e) as log(1 + e) e / ((1 + e) - 1) keeps small e exact."""
    e = tl.exp(-tl.abs(x))
    one_plus = 1.0 + e
    log1p = tl.where(one_plus == 1.0, e, tl.log(one_plus) * e / (one_plus - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _step_sizes(dt_ptr, bias, batch, ch, t, mask, s_b, s_d, s_t, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(Δ, dt + bias) of a (BLOCK_D, BLOCK_T) tile, Δ zero where masked (an identity step of the scan)."""
    x = tl.load(dt_ptr + batch * s_b + ch[:, None] * s_d + t[None, :] * s_t, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + bias[:, None]
    delta = x
    if SOFTPLUS:
        delta = _softplus(x)
    return tl.where(mask, delta, 0.0), x


@triton.jit
def _tile(ptr, batch, rows, t, mask, s_b, s_r, s_t):
    """A (rows, BLOCK_T) tile of a (batch, rows, L) tensor in float32, zero where masked."""
    return tl.load(ptr + batch * s_b + rows[:, None] * s_r + t[None, :] * s_t, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scan_forward_kernel(
        u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr,
        out_ptr, delta_ptr, mean_ptr, state_ptr,
        dim, length, n_state, n_chunks,
        su_b, su_d, su_t, sdt_b, sdt_d, sdt_t, sb_b, sb_n, sb_t, sc_b, sc_n, sc_t, sz_b, sz_d, sz_t,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        REVERSE: tl.constexpr, REPORT: tl.constexpr, SAVE_STATES: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    batch = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ns = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_T)
    ch_ok, n_ok = ch < dim, ns < n_state
    A = tl.load(a_ptr + ch[:, None] * n_state + ns[None, :], mask=ch_ok[:, None] & n_ok[None, :], other=0.0)
    skip = tl.load(d_ptr + ch, mask=ch_ok, other=0.0)  # (a dummy pointer, never used, without D or bias)
    bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0)
    edge = 0 if REVERSE else BLOCK_T - 1  # the chunk's last step in scan order
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for i in range(n_chunks):
        chunk = n_chunks - 1 - i if REVERSE else i
        if SAVE_STATES:
            tl.store(state_ptr + ((batch * dim + ch[:, None]) * n_chunks + chunk) * n_state + ns[None, :], h,
                     mask=ch_ok[:, None] & n_ok[None, :])
        t = chunk * BLOCK_T + steps
        t_ok = t < length
        mask = ch_ok[:, None] & t_ok[None, :]
        n_mask = n_ok[:, None] & t_ok[None, :]
        delta, _ = _step_sizes(dt_ptr, bias, batch, ch, t, mask, sdt_b, sdt_d, sdt_t, HAS_BIAS, SOFTPLUS)
        u = _tile(u_ptr, batch, ch, t, mask, su_b, su_d, su_t)
        Bt = _tile(b_ptr, batch, ns, t, n_mask, sb_b, sb_n, sb_t)
        Ct = _tile(c_ptr, batch, ns, t, n_mask, sc_b, sc_n, sc_t)
        decay = tl.exp(delta[:, None, :] * A[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_T)
        drive = (delta * u)[:, None, :] * Bt[None, :, :]
        decay, drive = tl.associative_scan((decay, drive), 2, _combine, reverse=REVERSE)
        states = decay * h[:, :, None] + drive
        y = tl.sum(states * Ct[None, :, :], axis=1)
        if HAS_D:
            y += skip[:, None] * u
        if HAS_Z:
            z = _tile(z_ptr, batch, ch, t, mask, sz_b, sz_d, sz_t)
            y = y * z * tl.sigmoid(z)
        offsets = (batch * dim + ch[:, None]) * length + t[None, :]
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)
        if REPORT:
            tl.store(delta_ptr + offsets, delta, mask=mask)
            tl.atomic_add(mean_ptr + batch * length + t, tl.sum(delta, axis=0) / dim, mask=t_ok)
        h = tl.sum(tl.where(steps[None, None, :] == edge, states, 0.0), axis=2)


@triton.jit
def _scan_backward_kernel(
        u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, dout_ptr, state_ptr,
        du_ptr, ddt_ptr, dz_ptr, da_ptr, db_ptr, dc_ptr, dd_ptr,
        dim, length, n_state, n_chunks,
        su_b, su_d, su_t, sdt_b, sdt_d, sdt_t, sb_b, sb_n, sb_t, sc_b, sc_n, sc_t, sz_b, sz_d, sz_t,
        so_b, so_d, so_t,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Adjoint q_t = C_t dy_t + exp(Δ_next A) q_next, run against scan order; a_t h_prev = h_t - drive_t
    gives the previous state without a shift. dB and dC are summed over channel blocks with atomics, dA
    and dD written per sequence (batch, d, N), (batch, d)."""
    batch = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ns = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_T)
    ch_ok, n_ok = ch < dim, ns < n_state
    dn_mask = ch_ok[:, None] & n_ok[None, :]
    A = tl.load(a_ptr + ch[:, None] * n_state + ns[None, :], mask=dn_mask, other=0.0)
    skip = tl.load(d_ptr + ch, mask=ch_ok, other=0.0)  # (a dummy pointer, never used, without D or bias)
    bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0)
    edge = BLOCK_T - 1 if REVERSE else 0  # the chunk's last step in adjoint order
    shift = -1 if REVERSE else 1  # the next step in scan order
    q = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    grad_a = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    grad_d = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(n_chunks):
        chunk = i if REVERSE else n_chunks - 1 - i
        t = chunk * BLOCK_T + steps
        t_ok = t < length
        mask = ch_ok[:, None] & t_ok[None, :]
        n_mask = n_ok[:, None] & t_ok[None, :]
        h = tl.load(state_ptr + ((batch * dim + ch[:, None]) * n_chunks + chunk) * n_state + ns[None, :],
                    mask=dn_mask, other=0.0)
        delta, x = _step_sizes(dt_ptr, bias, batch, ch, t, mask, sdt_b, sdt_d, sdt_t, HAS_BIAS, SOFTPLUS)
        u = _tile(u_ptr, batch, ch, t, mask, su_b, su_d, su_t)
        Bt = _tile(b_ptr, batch, ns, t, n_mask, sb_b, sb_n, sb_t)
        Ct = _tile(c_ptr, batch, ns, t, n_mask, sc_b, sc_n, sc_t)
        decay = tl.exp(delta[:, None, :] * A[:, :, None])
        drive = (delta * u)[:, None, :] * Bt[None, :, :]
        decay, states = tl.associative_scan((decay, drive), 2, _combine, reverse=REVERSE)
        states = decay * h[:, :, None] + states
        dy = _tile(dout_ptr, batch, ch, t, mask, so_b, so_d, so_t)
        offsets = (batch * dim + ch[:, None]) * length + t[None, :]
        if HAS_Z:
            y = tl.sum(states * Ct[None, :, :], axis=1)
            if HAS_D:
                y += skip[:, None] * u
            z = _tile(z_ptr, batch, ch, t, mask, sz_b, sz_d, sz_t)
            gate = tl.sigmoid(z)
            tl.store(dz_ptr + offsets, (dy * y * gate * (1.0 + z * (1.0 - gate))).to(dz_ptr.dtype.element_ty),
                     mask=mask)
            dy = dy * z * gate
        t_next = t + shift
        next_mask = ch_ok[:, None] & (t_next >= 0)[None, :] & (t_next < length)[None, :]
        delta_next, _ = _step_sizes(dt_ptr, bias, batch, ch, t_next, next_mask, sdt_b, sdt_d, sdt_t, HAS_BIAS,
                                    SOFTPLUS)
        decay_next = tl.exp(delta_next[:, None, :] * A[:, :, None])
        adjoint = dy[:, None, :] * Ct[None, :, :]
        decay_next, adjoint = tl.associative_scan((decay_next, adjoint), 2, _combine, reverse=not REVERSE)
        adjoint = decay_next * q[:, :, None] + adjoint
        decayed = states - drive  # exp(Δ_t A) h_prev
        qb = tl.sum(adjoint * Bt[None, :, :], axis=1)
        du = qb * delta
        if HAS_D:
            du += skip[:, None] * dy
            grad_d += tl.sum(dy * u, axis=1)
        ddelta = tl.sum(adjoint * decayed * A[:, :, None], axis=1) + qb * u
        if SOFTPLUS:
            ddelta = ddelta * tl.sigmoid(x)
        tl.store(du_ptr + offsets, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddt_ptr + offsets, ddelta, mask=mask)
        grad_a += tl.sum(adjoint * decayed * delta[:, None, :], axis=2)
        bc_offsets = (batch * n_state + ns[:, None]) * length + t[None, :]
        tl.atomic_add(db_ptr + bc_offsets, tl.sum(adjoint * (delta * u)[:, None, :], axis=0), mask=n_mask)
        tl.atomic_add(dc_ptr + bc_offsets, tl.sum(dy[:, None, :] * states, axis=0), mask=n_mask)
        q = tl.sum(tl.where(steps[None, None, :] == edge, adjoint, 0.0), axis=2)
    tl.store(da_ptr + (batch * dim + ch[:, None]) * n_state + ns[None, :], grad_a, mask=dn_mask)
    if HAS_D:
        tl.store(dd_ptr + batch * dim + ch, grad_d, mask=ch_ok)


def _blocks(dim: int, n_state: int, length: int, tile: int):
    """(BLOCK_D, BLOCK_N, BLOCK_T, number of chunks) for a tile budget of `tile` elements."""
    block_n = triton.next_power_of_2(n_state)
    block_t = min(32, max(16, triton.next_power_of_2(length)))
    block_d = max(1, min(triton.next_power_of_2(dim), tile // (block_n * block_t)))
    return block_d, block_n, block_t, triton.cdiv(length, block_t)


def _strides(t: torch.Tensor):
    return tuple(t.stride())


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, z, bias, softplus, reverse, report, save):
        batch, dim, length = u.shape
        n_state = A.shape[1]
        A32 = A.float().contiguous()
        D32 = None if D is None else D.float().contiguous()
        bias32 = None if bias is None else bias.float().contiguous()
        block_d, block_n, block_t, n_chunks = _blocks(dim, n_state, length, FORWARD_TILE)
        out = u.new_empty(batch, dim, length)
        delta = u.new_empty((batch, dim, length) if report else (0,), dtype=torch.float32)
        mean = u.new_zeros((batch, length) if report else (0,), dtype=torch.float32)
        states = u.new_empty((batch, dim, n_chunks, n_state) if save else (0,), dtype=torch.float32)
        _scan_forward_kernel[(batch, triton.cdiv(dim, block_d))](
            u, dt, A32, B, C, u if D32 is None else D32, u if z is None else z, u if bias32 is None else bias32,
            out, delta, mean, states, dim, length, n_state, n_chunks,
            *_strides(u), *_strides(dt), *_strides(B), *_strides(C), *(_strides(z) if z is not None else (0, 0, 0)),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
            REVERSE=reverse, REPORT=report, SAVE_STATES=save,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t)
        if save:
            ctx.save_for_backward(u, dt, A32, B, C, D32, z, bias32, states)
        ctx.flags = (A.dtype, None if D is None else D.dtype, None if bias is None else bias.dtype, softplus,
                     reverse, report)
        if not report:
            ctx.mark_non_differentiable(delta, mean)
        return out, delta, mean

    @staticmethod
    def backward(ctx, dout, ddelta_out, dmean_out):
        u, dt, A, B, C, D, z, bias, states = ctx.saved_tensors
        a_dtype, d_dtype, bias_dtype, softplus, reverse, report = ctx.flags
        batch, dim, length = u.shape
        n_state = A.shape[1]
        block_d, block_n, block_t, n_chunks = _blocks(dim, n_state, length, BACKWARD_TILE)
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        ddt = u.new_empty(batch, dim, length, dtype=torch.float32)
        dz = None if z is None else torch.empty_like(z, memory_format=torch.contiguous_format)
        dA = u.new_empty(batch, dim, n_state, dtype=torch.float32)
        dB = u.new_zeros(batch, n_state, length, dtype=torch.float32)
        dC = u.new_zeros(batch, n_state, length, dtype=torch.float32)
        dD = u.new_empty(batch, dim, dtype=torch.float32) if D is not None else None
        _scan_backward_kernel[(batch, triton.cdiv(dim, block_d))](
            u, dt, A, B, C, u if D is None else D, u if z is None else z, u if bias is None else bias, dout, states,
            du, ddt, du if dz is None else dz, dA, dB, dC, ddt if dD is None else dD,
            dim, length, n_state, n_chunks,
            *_strides(u), *_strides(dt), *_strides(B), *_strides(C), *(_strides(z) if z is not None else (0, 0, 0)),
            *_strides(dout),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
            REVERSE=reverse, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=block_t)
        if report and (ddelta_out is not None or dmean_out is not None):
            # gradients reaching the reported Δ directly, through softplus(dt + bias)
            extra = torch.zeros_like(ddt)
            if ddelta_out is not None:
                extra += ddelta_out
            if dmean_out is not None:
                extra += dmean_out[:, None, :] / dim
            if softplus:
                x = dt.float() + (bias[:, None] if bias is not None else 0.0)
                extra *= torch.sigmoid(x)
            ddt += extra
        dbias = None if bias is None else ddt.sum((0, 2)).to(bias_dtype)
        return (du, ddt.to(dt.dtype), dA.sum(0).to(a_dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if dD is None else dD.sum(0).to(d_dtype), dz, dbias, None, None, None, None)


def _check(u, dt, A, B, C, D, z, bias):
    if u.dim() != 3:
        raise ValueError(f"triton selective scan: u must be (batch, d, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"triton selective scan: A must be (d, N) = ({dim}, N), got shape {tuple(A.shape)}")
    n_state = A.shape[1]
    expected = {"delta": (dt, (batch, dim, length)), "B": (B, (batch, n_state, length)),
                "C": (C, (batch, n_state, length)), "D": (D, (dim,)), "z": (z, (batch, dim, length)),
                "delta_bias": (bias, (dim,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"triton selective scan: {name} has shape {tuple(t.shape)}, expected {shape} for u "
                             f"of shape {tuple(u.shape)} and A of shape {tuple(A.shape)}")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for name, t in (("u", u), ("delta", dt), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in dtypes:
            raise ValueError(f"triton selective scan takes float32, float16 or bfloat16 tensors; {name} is {t.dtype}")
    devices = {t.device for t in (u, dt, A, B, C, D, z, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"triton selective scan: all inputs need to be on one device, got {sorted(map(str, devices))}")
    if not handles(u.device):
        raise ValueError(f"triton selective scan runs on CUDA tensors (CPU ones only under TRITON_INTERPRET=1), "
                         f"got {u.device}")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          reverse=False, report=False):
    """Selective scan of one direction; differentiable in every tensor argument.

    Args:
        u, delta: (batch, d, L); A: (d, N); B, C: (batch, N, L); D, delta_bias: (d,) or None; z:
            (batch, d, L) or None. u, delta, B, C, z float32, bfloat16 or float16, any strides.
        delta_softplus: Δ = softplus(delta + delta_bias), else delta + delta_bias.
        reverse: scan from the last token to the first, output in sequence order.
        report: also return Δ and its mean over channels.

    Returns:
        out (batch, d, L) in u's dtype, y SiLU(z) when z is given; with report also Δ (batch, d, L) and
        its mean over channels (batch, L), float32.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, step, mean = _TritonScan.apply(*tensors, bool(delta_softplus), bool(reverse), bool(report), save)
    return (out, step, mean) if report else out
