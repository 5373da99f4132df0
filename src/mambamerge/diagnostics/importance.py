"""What a token is worth, and which per-token statistic says so.

A token's worth before block l is measured by leaving it out: the token is removed from both streams
entering block l, the rest of the model runs on the shorter sequence, and the output is compared with
the dense one (KL divergence of the class distributions, and the drop of the true class's logit).
Each candidate statistic (the step size Δ in many forms, what a token writes into the state, its
distance to the class token) is then judged by its Spearman rank correlation with that worth, per
image: a positive ρ means tokens with a high statistic are the costly ones to remove.
"""
from typing import Dict, List, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mambamerge.diagnostics.probe import DIRECTIONS, Trace, block_scans, class_feature_from, class_index, \
    inverse_softplus, trace
from mambamerge.models.mixer import ScanInputs

AGGREGATES = ("mean", "l2", "max")
SOURCES = ("this", "next")  # the block just run before the removal (what a method can read), or the next one


class LeaveOneOut(NamedTuple):
    """Leave-one-out effects before one block, per image and token; NaN at the class token.

    kl:         (B, L) KL(dense || without the token) of the class distributions.
    logit_drop: (B, L) dense true-class logit minus the one without the token.
    """

    kl: torch.Tensor
    logit_drop: torch.Tensor


def without_each_token(x: torch.Tensor, cls_index: int) -> torch.Tensor:
    """Every copy of a sequence with one non-class token left out. x: (L, D) -> (L - 1, L - 1, D), copy i
    without the i-th non-class token (token i left of the class token, i + 1 right of it)."""
    length = x.shape[0]
    removed = torch.tensor([t for t in range(length) if t != cls_index], device=x.device)
    keep = torch.arange(length, device=x.device)[None, :] != removed[:, None]  # (L - 1, L)
    return x[None].expand(length - 1, -1, -1)[keep].view(length - 1, length - 1, x.shape[1])


def leave_one_out_logits(model, hidden: torch.Tensor, residual, block: int, cls_index: int,
                         chunk: int = 64) -> torch.Tensor:
    """Logits with each non-class token left out before `block`, batched `chunk` removals at a time.

    hidden, residual: (B, L, D) the streams entering the block (residual None before block 0).
    Returns (B, L, classes), NaN in the class token's row."""
    batch, length, _ = hidden.shape
    rows = []
    for b in range(batch):
        h_all = without_each_token(hidden[b], cls_index)
        r_all = None if residual is None else without_each_token(residual[b], cls_index)
        # the class token moves one slot left when the removed token was left of it
        cls_all = torch.tensor([cls_index - (t < cls_index) for t in range(length) if t != cls_index],
                               device=hidden.device)
        out = []
        for start in range(0, length - 1, chunk):
            part = slice(start, start + chunk)
            feature = class_feature_from(model, h_all[part], None if r_all is None else r_all[part], block,
                                         cls_all[part])
            out.append(model.head(feature))
        logits = torch.cat(out)
        rows.append(torch.cat((logits[:cls_index], torch.full_like(logits[:1], float("nan")), logits[cls_index:])))
    return torch.stack(rows)


def loo_effects(dense: torch.Tensor, removed: torch.Tensor, labels: torch.Tensor) -> LeaveOneOut:
    """dense (B, classes), removed (B, L, classes), labels (B,) -> LeaveOneOut."""
    log_p = F.log_softmax(dense.double(), dim=-1)[:, None]  # (B, 1, C)
    log_q = F.log_softmax(removed.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    true = labels[:, None, None].expand(-1, removed.shape[1], 1)
    drop = dense.double().gather(1, labels[:, None]) - removed.double().gather(2, true)[..., 0]
    return LeaveOneOut(kl, drop)


def leave_one_out(model, images: torch.Tensor, labels: torch.Tensor, block: int, chunk: int = 64) -> LeaveOneOut:
    """Leave-one-out effects of every token before `block` for images (B, C, H, W) with labels (B,)."""
    with torch.inference_mode():
        tr = trace(model, images)
        removed = leave_one_out_logits(model, tr.hidden[block], tr.residual[block], block, class_index(model), chunk)
    return loo_effects(tr.logits, removed, labels)


def _aggregate(x: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, d) -> (B, L) over channels."""
    if how == "mean":
        return x.mean(-1)
    if how == "l2":
        return x.norm(dim=-1)
    return x.amax(-1)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel over tokens: (B, L, d) -> (B, L, d)."""
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp(min=1e-12)


def step_size_statistics(scans: Dict[str, ScanInputs]) -> Dict[str, torch.Tensor]:
    """Per-token statistics of one block's scans, {name: (B, L)}.

    Names "quantity:aggregate:direction": quantity delta (after softplus), raw (before it), delta_z /
    raw_z (z-scored per channel over the tokens of the image); aggregate over channels mean, l2, max;
    direction fwd, bwd or sum (the two added). Plus "write:sum:<direction>": what a token writes into
    the state, sum_d Δ_t[d] ||B_t|| |u_t[d]|."""
    per_direction: Dict[str, Dict[str, torch.Tensor]] = {}
    for direction in DIRECTIONS:
        s = scans[direction]
        raw = inverse_softplus(s.delta)
        quantities = {"delta": s.delta, "raw": raw, "delta_z": _zscore(s.delta), "raw_z": _zscore(raw)}
        stats = {f"{q}:{how}": _aggregate(v, how) for q, v in quantities.items() for how in AGGREGATES}
        stats["write:sum"] = (s.delta * s.u.abs()).sum(-1) * s.B.norm(dim=-1)
        per_direction[direction] = stats
    out = {}
    for key in per_direction["fwd"]:
        fwd, bwd = per_direction["fwd"][key], per_direction["bwd"][key]
        out.update({f"{key}:fwd": fwd, f"{key}:bwd": bwd, f"{key}:sum": fwd + bwd})
    return out


def candidate_statistics(model, tr: Trace, block: int) -> Dict[str, torch.Tensor]:
    """Every candidate statistic for removals before `block` >= 1, {name: (B, L)}: the step-size
    statistics of the block just run ("...:this") and of the next one ("...:next"), the class-token
    proximity -|t - cls| and the L2 norm of the summed streams entering the block."""
    if not 1 <= block < len(model.layers):
        raise ValueError(f"removals are judged before blocks 1..{len(model.layers) - 1}, got block {block}")
    out = {}
    for source, b in zip(SOURCES, (block - 1, block)):
        out.update({f"{k}:{source}": v for k, v in step_size_statistics(block_scans(model, tr, b)).items()})
    hidden, residual = tr.hidden[block], tr.residual[block]
    length = hidden.shape[1]
    proximity = -(torch.arange(length, device=hidden.device) - class_index(model)).abs().to(hidden.dtype)
    out["cls_proximity"] = proximity.expand(hidden.shape[0], -1)
    out["stream_norm"] = (hidden + residual).norm(dim=-1)
    return out


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last axis, ties sharing their average rank. (..., n) -> (..., n) float64."""
    x = x.double()
    below = (x[..., None, :] < x[..., :, None]).sum(-1)
    equal = (x[..., None, :] == x[..., :, None]).sum(-1)
    return below + (equal + 1) / 2.0


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last axis. (..., n) x2 -> (...); NaN where one side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.norm(dim=-1) * ry.norm(dim=-1))


def lowest_cost(stat: torch.Tensor, cost: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean cost of the `fraction` of tokens with the lowest statistic over the mean cost of all tokens, per
    image: below 1, removing the tokens the statistic ranks lowest costs less than removing tokens at
    random. stat, cost: (B, n) -> (B,) float64."""
    k = max(1, round(fraction * stat.shape[1]))
    low = stat.double().topk(k, dim=1, largest=False).indices
    cost = cost.double()
    return cost.gather(1, low).mean(1) / cost.mean(1)


def correlations(effects: LeaveOneOut, stats: Dict[str, torch.Tensor], cls_index: int,
                 fraction: float = 0.2) -> Dict[str, dict]:
    """Per statistic, over the non-class tokens of each image: Spearman ρ with the leave-one-out KL
    ("kl") and logit drop ("logit_drop"), and the relative KL of the `fraction` it ranks lowest
    ("low_cost", see lowest_cost): {name: {key: (B,) float64}}."""
    keep = torch.ones(effects.kl.shape[1], dtype=torch.bool)
    keep[cls_index] = False
    kl, drop = effects.kl[:, keep].cpu(), effects.logit_drop[:, keep].cpu()
    out = {}
    for name, value in stats.items():
        v = value[:, keep].cpu()
        out[name] = {"kl": spearman(v, kl), "logit_drop": spearman(v, drop), "low_cost": lowest_cost(v, kl, fraction)}
    return out


def importance_study(model, images: torch.Tensor, labels: torch.Tensor, blocks: Sequence[int],
                     chunk: int = 64) -> Dict[int, dict]:
    """Leave-one-out worth before each of `blocks` and its rank correlation with every candidate statistic.

    images (B, C, H, W), labels (B,). Returns {block: {"loo": LeaveOneOut, "rho": {name: {"kl": (B,),
    "logit_drop": (B,)}}}}."""
    out = {}
    with torch.inference_mode():
        tr = trace(model, images)
        for block in blocks:
            stats = candidate_statistics(model, tr, block)
            removed = leave_one_out_logits(model, tr.hidden[block], tr.residual[block], block, class_index(model),
                                           chunk)
            effects = loo_effects(tr.logits, removed, labels)
            out[block] = {"loo": effects, "rho": correlations(effects, stats, class_index(model))}
    return out


def summarise(study: Dict[int, dict], target: str = "kl") -> List[dict]:
    """One row per statistic: the mean over images of `target` ("kl" or "logit_drop": ρ; "low_cost")
    per block, its mean over blocks and its range. Sorted by the mean over blocks, highest first."""
    blocks = sorted(study)
    names = list(study[blocks[0]]["rho"])
    rows = []
    for name in names:
        per_block = {b: float(study[b]["rho"][name][target].nanmean()) for b in blocks}
        values = list(per_block.values())
        rows.append({"statistic": name, "by_block": per_block, "mean": sum(values) / len(values),
                     "min": min(values), "max": max(values)})
    return sorted(rows, key=lambda r: -r["mean"])
