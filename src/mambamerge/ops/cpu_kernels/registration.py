"""The kernels as torch custom operators (torch.ops.mambamerge.*): torch.compile traces each as one graph
node (shapes from its fake implementation), autograd goes through its registered backward. Each
implementation allocates its outputs contiguous and calls the kernel once; the fake implementations give
the same shapes and strides without running anything."""
from typing import Callable, Optional, Sequence

import torch


def register(name: str, impl: Callable, fake: Callable, backward: Optional[Callable] = None,
             setup_context: Optional[Callable] = None):
    """impl (annotated: its schema is read from the annotations) as the CPU operator
    torch.ops.mambamerge.<name>, with its fake implementation and, when given, its backward and the
    setup_context that saves what the backward reads; returns the operator."""
    op = torch.library.custom_op(f"mambamerge::{name}", impl, mutates_args=(), device_types="cpu")
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return getattr(torch.ops.mambamerge, name)


def dispatch(op, impl: Callable, args: Sequence, differentiable: Sequence[torch.Tensor] = ()):
    """op(*args) under torch.compile or where autograd records the call (any of `differentiable` needs a
    gradient); elsewhere impl(*args), the same kernel without the dispatcher, whose cost buys nothing in
    eager inference (2.5% of a batch-1 Vim-Ti forward's CPU time, 12% with MaMe merging half the tokens:
    benchmarks/dispatch.py)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)):
        return op(*args)
    return impl(*args)
