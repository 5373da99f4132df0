"""The whole Mamba mixer of a block in one kernel call (mm_mixer_forward in kernels.cpp), optionally after
the block's residual add and RMSNorm: float32 CPU inference, the projections on torch's BLAS (under bf16
autocast in_proj, x_proj and out_proj on its bf16 gemm). A custom operator without autograd: training
takes the mixer's torch path."""
import array
from typing import List, Optional

import torch

from mambamerge.ops.cpu_kernels.blas import bf16_gemm_address, bf16_gemm_found, gemm_address
from mambamerge.ops.cpu_kernels.library import address, available, call, loaded
from mambamerge.ops.cpu_kernels.registration import dispatch, register

BRANCH_PARAMS = 6  # conv1d weight, conv1d bias, x_proj weight, dt_proj weight, dt_proj bias, D
_SLOTS = 2  # branches and scans a call describes (unused ones zeroed)


def _outputs_like(hidden, norm, out_proj, branches, stats):
    batch, length, d_model = hidden.shape
    out = [hidden.new_empty(batch, length, out_proj.shape[0])]
    if norm is not None:
        out.append(hidden.new_empty(batch, length, d_model))
    if stats:
        d_inner, width = branches[3].shape[0], branches[2].shape[0]  # dt_proj (d_inner, R), x_proj (R + 2N, d)
        for _ in range(len(branches) // BRANCH_PARAMS):
            out += [hidden.new_empty(batch, length, d_inner), hidden.new_empty(batch, length, width),
                    hidden.new_empty(batch, length)]
    return out


def _forward(hidden: torch.Tensor, residual: Optional[torch.Tensor], norm: Optional[torch.Tensor], eps: float,
             in_proj: torch.Tensor, out_proj: torch.Tensor, branches: List[torch.Tensor], branch_reverse: List[bool],
             a_logs: List[torch.Tensor], scan_branch: List[int], scan_reverse: List[bool], halve: bool,
             stats: bool, bf16: bool) -> List[torch.Tensor]:
    hidden, in_proj, out_proj = hidden.contiguous(), in_proj.contiguous(), out_proj.contiguous()
    residual = None if residual is None else residual.contiguous()
    norm = None if norm is None else norm.contiguous()
    branches, a_logs = [t.contiguous() for t in branches], [t.contiguous() for t in a_logs]
    batch, length, d_model = hidden.shape
    d_inner, dt_rank = branches[3].shape
    outputs = _outputs_like(hidden, norm, out_proj, branches, stats)
    first_stat = 1 if norm is None else 2
    # the fields of MixerProblem in kernels.cpp, in order
    words = [hidden.data_ptr(), address(residual), address(norm), 0 if norm is None else outputs[1].data_ptr(),
             in_proj.data_ptr(), out_proj.data_ptr(), outputs[0].data_ptr(), batch, length, d_model, d_inner,
             (branches[2].shape[0] - dt_rank) // 2, dt_rank, branches[0].shape[-1], len(branch_reverse),
             len(scan_branch), int(halve)]
    for i, reverse in enumerate(branch_reverse):
        words += [t.data_ptr() for t in branches[i * BRANCH_PARAMS:(i + 1) * BRANCH_PARAMS]]
        words.append(int(reverse))
        words += ([t.data_ptr() for t in outputs[first_stat + 3 * i:first_stat + 3 * (i + 1)]] if stats
                  else [0, 0, 0])
    words += [0] * (BRANCH_PARAMS + 4) * (_SLOTS - len(branch_reverse))
    for a_log, branch, reverse in zip(a_logs, scan_branch, scan_reverse):
        words += [a_log.data_ptr(), branch, int(reverse)]
    words += [0] * 3 * (_SLOTS - len(scan_branch))
    problem = array.array("q", words)  # every tensor passed by address stays referenced until the call returns
    if hidden.numel() and call("mm_mixer_forward", None, problem.buffer_info()[0], eps, gemm_address(),
                               bf16_gemm_address() if bf16 else None, torch.get_num_threads(),
                               loaded().launcher) != 0:
        raise MemoryError("mixer kernel failed: its buffers could not grow or a worker thread could not run")
    return outputs


_MIXER = register("mixer_forward", _forward,
                  lambda hidden, residual, norm, eps, in_proj, out_proj, branches, branch_reverse, a_logs, scan_branch,
                  scan_reverse, halve, stats, bf16: _outputs_like(hidden, norm, out_proj, branches, stats))


@torch.compiler.assume_constant_result
def mixer_available() -> bool:
    """The kernel library is loaded and torch exports a working sgemm_."""
    return available() and gemm_address() is not None


@torch.compiler.assume_constant_result
def bf16_mixer_available() -> bool:
    """mixer_available, and torch exports a working bf16 gemm for its bf16 products."""
    return mixer_available() and bf16_gemm_found()


def mixer_forward(hidden, residual, norm, eps, in_proj, out_proj, branches, branch_reverse, a_logs, scan_branch,
                  scan_reverse, halve, stats, bf16=False):
    """One mixer forward (mambamerge.models.mixer.MambaMixer), without autograd, float32 CPU tensors,
    optionally after its block's residual add and RMSNorm (mambamerge.models.blocks.Block).

    hidden: (batch, L, d_model); norm: the RMSNorm's weight (d_model,) with its eps, or None: hidden is
    the mixer's input; residual (batch, L, d_model) or None (the first block); in_proj (2 d_inner,
    d_model), out_proj (d_model, d_inner): the linear weights; branches: per branch (one or two) its
    BRANCH_PARAMS tensors in that order, with branch_reverse its convolution's direction; per scan (one or
    two) its A_log (d_inner, N), its branch's index and its direction; halve: halve the sum of two scans.
    bf16: in_proj, x_proj and out_proj take their input and weight rounded to bf16 (float32 products, as
    bf16 autocast's matmuls; where bf16_mixer_available) past the few rows of a merged model's last
    blocks, whose weight reads bound them in float32 too.
    Returns [out (batch, L, d_model)], then with a norm the new residual (residual + hidden, or hidden),
    then when stats each branch's delta (batch, L, d_inner), x_proj output (batch, L, dt_rank + 2N: dt,
    B, C) and delta's mean over channels (batch, L). All float32.
    """
    return dispatch(_MIXER, _forward, (hidden, residual, norm, float(eps), in_proj, out_proj, list(branches),
                                       list(branch_reverse), list(a_logs), list(scan_branch), list(scan_reverse),
                                       bool(halve), bool(stats), bool(bf16)))
