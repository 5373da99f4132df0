"""Running a model piece by piece: the streams entering every block, and the scans inside a mixer.

Only the model's public pieces are used (embed, layers, final_norm, head, layout, and the mixer's
forward with a scan of the probe's own), so every diagnostic works on any family built from `Block` and `MambaMixer`
that has a class token.
"""
from typing import Dict, List, NamedTuple, Optional, Union

import torch

from mambamerge.models.mixer import ScanInputs
from mambamerge.runner import class_feature

DIRECTIONS = ("fwd", "bwd")


class Trace(NamedTuple):
    """One dense forward, kept block by block.

    hidden[l], residual[l]: (B, L, D) the two streams entering block l (residual[0] is None);
        index `depth` holds what enters the final norm.
    logits: (B, classes).
    """

    hidden: List[torch.Tensor]
    residual: List[Optional[torch.Tensor]]
    logits: torch.Tensor


def class_index(model) -> int:
    """Index of the model's class token in the embedded sequence; a ValueError for a model without one."""
    index = model.layout.cls_index
    if index is None:
        raise ValueError("the diagnostics measure what reaches the class token, and this model has none")
    return index


def trace(model, images: torch.Tensor) -> Trace:
    """Dense forward of images (B, C, H, W) keeping the streams entering every block."""
    hidden, residual = model.embed(images), None
    hiddens, residuals = [hidden], [residual]
    for block in model.layers:
        hidden, residual = block(hidden, residual)
        hiddens.append(hidden)
        residuals.append(residual)
    logits = model.head(model.final_norm(hidden, residual)[:, class_index(model)])
    return Trace(hiddens, residuals, logits)


def class_feature_from(model, hidden: torch.Tensor, residual: Optional[torch.Tensor], start: int,
                       cls_index: Union[int, torch.Tensor]) -> torch.Tensor:
    """Normalised class-token feature (B, D) from the streams (B, L, D) entering block `start` < depth, the
    class token at cls_index (an int, or (B,) one per sequence). Logits: model.head of it."""
    for block in model.layers[start:]:
        hidden, residual = block(hidden, residual)
    return class_feature(model.final_norm(hidden, residual), cls_index)


def mixer_input(block, hidden: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """What a block hands its mixer: RMSNorm of the summed streams. (B, L, D) -> (B, L, D)."""
    summed = hidden if residual is None else residual + hidden
    return block.norm(summed.to(torch.promote_types(summed.dtype, torch.float32)))


def scan_inputs(mixer, x: torch.Tensor) -> Dict[str, ScanInputs]:
    """The selective-scan inputs of both directions of a mixer, as its own forward computes them (in the
    scan dtype: at least float32). A one-direction mixer reports its scan as both, as its SSMStats do.

    x: (B, L, D) the mixer's input. Returns {"fwd": ScanInputs, "bwd": ScanInputs}."""
    seen = []

    def keep(inputs: ScanInputs) -> torch.Tensor:
        seen.append(inputs)
        return torch.zeros_like(inputs.u)  # the forward's output is not read

    mixer(x, scan=keep)
    return {"fwd": seen[0], "bwd": seen[-1]}


def block_scans(model, tr: Trace, block: int) -> Dict[str, ScanInputs]:
    """The scan inputs of both directions of block `block` in the traced forward."""
    layer = model.layers[block]
    return scan_inputs(layer.mixer, mixer_input(layer, tr.hidden[block], tr.residual[block]))


def inverse_softplus(delta: torch.Tensor) -> torch.Tensor:
    """The raw step size before softplus, stably: x = Δ + log(1 - exp(-Δ)). Any shape."""
    return delta + torch.log(-torch.expm1(-delta))
