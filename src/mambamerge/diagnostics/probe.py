"""Running a model piece by piece: the streams entering every block, and the scans inside a mixer.

Only the model's public pieces are used (embed, layers, final_norm, head, layout, and the mixer's
checkpoint parameters), so every diagnostic works on any family built from `Block` and `MambaMixer`
that has a class token.
"""
from typing import Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from mambamerge.models.blocks import depthwise_conv_along_sequence
from mambamerge.runner import class_feature

DIRECTIONS = ("fwd", "bwd")
_SUFFIX = {"fwd": "", "bwd": "_b"}


class Trace(NamedTuple):
    """One dense forward, kept block by block.

    hidden[l], residual[l]: (B, L, D) the two streams entering block l (residual[0] is None);
        index `depth` holds what enters the final norm.
    logits: (B, classes).
    """

    hidden: List[torch.Tensor]
    residual: List[Optional[torch.Tensor]]
    logits: torch.Tensor


class ScanInputs(NamedTuple):
    """What one direction's selective scan takes, sequence order (shapes as mambamerge.ops.selective_scan).

    u, delta: (B, L, d_inner); A: (d_inner, N); B, C: (B, L, N); D: (d_inner,); reverse: scan direction.
    """

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    reverse: bool


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


def _branch(mixer, xs: torch.Tensor, suffix: str, reverse: bool):
    """u, Δ, B, C of one convolution + projection branch, in the dtype of xs (B, L, d_inner)."""
    dtype = xs.dtype
    conv = getattr(mixer, "conv1d" + suffix)
    u = F.silu(depthwise_conv_along_sequence(xs, conv.weight.to(dtype), conv.bias.to(dtype), reverse))
    proj = F.linear(u, getattr(mixer, "x_proj" + suffix).weight.to(dtype))
    dt, B, C = torch.split(proj, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt_proj = getattr(mixer, "dt_proj" + suffix)
    return u, F.softplus(F.linear(dt, dt_proj.weight.to(dtype), dt_proj.bias.to(dtype))), B, C


def scan_inputs(mixer, x: torch.Tensor) -> Dict[str, ScanInputs]:
    """The selective-scan inputs of both directions of a mixer, recomputed from its parameters (in_proj,
    conv1d(_b), x_proj(_b), dt_proj(_b), A_log / A_b_log, D(_b)), in the dtype of x. Variants: "bi"
    (a branch per direction), "bi_shared" (one forward branch scanned both ways, A_b_log backward),
    "forward" (one scan; reported as both directions, as its SSMStats are).

    x: (B, L, D) the mixer's input. Returns {"fwd": ScanInputs, "bwd": ScanInputs}."""
    dtype = x.dtype
    xs, _ = F.linear(x, mixer.in_proj.weight.to(dtype)).chunk(2, dim=-1)
    u, delta, B, C = _branch(mixer, xs, "", reverse=False)
    fwd = ScanInputs(u, delta, -torch.exp(mixer.A_log.to(dtype)), B, C, mixer.D.to(dtype), False)
    if mixer.variant == "forward":
        return {"fwd": fwd, "bwd": fwd}
    if mixer.variant == "bi_shared":
        return {"fwd": fwd, "bwd": fwd._replace(A=-torch.exp(mixer.A_b_log.to(dtype)), reverse=True)}
    u, delta, B, C = _branch(mixer, xs, "_b", reverse=True)
    return {"fwd": fwd, "bwd": ScanInputs(u, delta, -torch.exp(mixer.A_b_log.to(dtype)), B, C,
                                          mixer.D_b.to(dtype), True)}


def block_scans(model, tr: Trace, block: int) -> Dict[str, ScanInputs]:
    """The scan inputs of both directions of block `block` in the traced forward."""
    layer = model.layers[block]
    return scan_inputs(layer.mixer, mixer_input(layer, tr.hidden[block], tr.residual[block]))


def mixer_output(mixer, x: torch.Tensor, scans: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The mixer's output from its scan outputs: combine, gate by SiLU(z), out_proj.
    x: (B, L, D) the mixer's input; scans: {"fwd": y_f, "bwd": y_b}, each (B, L, d_inner) in sequence
    order (a one-direction mixer reads "fwd" only)."""
    dtype = x.dtype
    _, z = F.linear(x, mixer.in_proj.weight.to(dtype)).chunk(2, dim=-1)
    if mixer.variant == "forward":
        return F.linear(scans["fwd"] * F.silu(z), mixer.out_proj.weight.to(dtype))
    y = (scans["fwd"] + scans["bwd"]) * F.silu(z)
    if mixer.divide_out:
        y = y * 0.5
    return F.linear(y, mixer.out_proj.weight.to(dtype))


def inverse_softplus(delta: torch.Tensor) -> torch.Tensor:
    """The raw step size before softplus, stably: x = Δ + log(1 - exp(-Δ)). Any shape."""
    return delta + torch.log(-torch.expm1(-delta))
