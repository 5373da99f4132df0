"""Which original patches each remaining token holds after every reduction step, and the Δ map of an input.

`StepRecorder` wraps a method: at every step it keeps the source map after the step (which original
tokens each new token holds). Group ids are the smallest original patch index in the group, so a
token that never merges keeps its id (and colour) from step to step.
"""
from typing import Dict, List, Optional

import torch

from mambamerge.diagnostics.importance import step_size_statistics
from mambamerge.diagnostics.probe import block_scans, trace
from mambamerge.diagnostics.wrapper import MethodWrapper
from mambamerge.merge.base import ReductionMethod
from mambamerge.merge.plan import MergePlan
from mambamerge.merge.state import TokenState
from mambamerge.tokens import SSMStats
from mambamerge.patch import patch, unpatch


class StepRecorder(MethodWrapper):
    """A method that also keeps, per step, the (B, L', L0) source map after it (needs track_source)."""

    def __init__(self, method: ReductionMethod):
        super().__init__(method)
        self.sources: List[torch.Tensor] = []

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        plan = self.method.plan(state, ssm, r)
        self.sources.append(plan.add_up(state.source))
        return plan


def patch_slots(layout) -> torch.Tensor:
    """(M,) long: the sequence index of each patch, patches in grid order (every slot but the class token's)."""
    return torch.tensor([t for t in range(layout.length) if t != layout.cls_index])


def patch_groups(source: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Group id of every patch: the smallest patch index held by the token holding it, -1 if dropped.
    source (B, L', L0), patches (M,) embedded index of each patch -> (B, M) long."""
    held = source[:, :, patches] > 0  # (B, L', M)
    order = torch.arange(patches.numel(), device=source.device)
    first = torch.where(held, order, patches.numel()).amin(dim=2)  # (B, L') smallest patch per token
    holder = held.float().argmax(dim=1)  # (B, M)
    return torch.where(held.any(dim=1), first.gather(1, holder), -1)


def merge_steps(model, images: torch.Tensor, method: str, reduction: float, **options) -> List[Dict[str, object]]:
    """Run `method` at `reduction` on inputs (B, *model.input_shape) and describe each step:
    [{"block": the block it precedes, "tokens": tokens after it, "groups": (B, M) patch group ids}].
    The model is left unpatched."""
    unpatch(model)
    try:
        patch(model, method, reduction=reduction, track_source=True, **options)
        recorder = StepRecorder(model.token_reducer.method)
        model.token_reducer.method = recorder
        with torch.inference_mode():
            model(images)
        blocks = [b for b, r in enumerate(model.token_reducer.schedule.removals) if r > 0]
    finally:
        unpatch(model)
    patches = patch_slots(model.layout).to(images.device)
    return [{"block": block, "tokens": source.shape[1], "groups": patch_groups(source, patches).cpu()}
            for block, source in zip(blocks, recorder.sources)]


def delta_map(model, images: torch.Tensor, block: int) -> torch.Tensor:
    """MaMe's importance (mean over channels of Δ, forward plus backward) of block `block` in the dense
    model, per patch: inputs (B, *model.input_shape) -> (B, M), patches in grid order."""
    with torch.inference_mode():
        stats = step_size_statistics(block_scans(model, trace(model, images), block))
    return stats["delta:mean:sum"][:, patch_slots(model.layout).to(images.device)].cpu()
