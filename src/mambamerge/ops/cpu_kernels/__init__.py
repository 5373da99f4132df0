"""The CPU kernels of kernels.cpp: the selective scan, the step-size softplus, the convolution + SiLU before
the scan and the gate after it, the whole mixer in one call (its projections on torch's BLAS, in bf16 under
bf16 autocast), and
choosing, planning and applying a token-merge step (the "compiled" implementation of mambamerge.ops; torch.compile
is another matter).

build.py compiles the library with g++ on first use into a cache directory; library.py loads it with
ctypes (which releases the GIL during the call) from one table of its entry points; the kernels run on
``torch.get_num_threads()`` threads, taken from torch's own OpenMP team when torch uses OpenMP
(openmp.py), else started with std::thread. Each kernel is a torch custom operator
(torch.ops.mambamerge.*, registration.py) with a fake implementation and, where differentiable, a
registered backward, so torch.compile captures models that use them without graph breaks.
"""
from mambamerge.ops.cpu_kernels.mixer_ops import conv_silu, gate
from mambamerge.ops.cpu_kernels.library import available, handles, unavailable_reason
from mambamerge.ops.cpu_kernels.mixer_kernel import BRANCH_PARAMS, bf16_mixer_available, mixer_available, mixer_forward
from mambamerge.ops.cpu_kernels.merge import can_merge, can_plan, merge_apply, plan_from_selection
from mambamerge.ops.cpu_kernels.scan import selective_scan
from mambamerge.ops.cpu_kernels.selection import can_select, select_adjacent, select_bipartite, select_mame
from mambamerge.ops.cpu_kernels.softplus import softplus, softplus_with_row_mean

__all__ = ["BRANCH_PARAMS", "available", "bf16_mixer_available", "can_merge", "can_plan", "can_select", "conv_silu", "gate", "handles",
           "merge_apply", "mixer_available", "mixer_forward", "plan_from_selection", "select_adjacent",
           "select_bipartite", "select_mame", "selective_scan", "softplus", "softplus_with_row_mean",
           "unavailable_reason"]
