"""Limited directional sequential dependence (STM's claim), measured.

Perturbation: one token entering a block is nudged (relative size eps); how much the class token's
output moves, against the token's signed distance t - cls from the class token (negative: left of it,
seen by the forward scan first). Order: the tokens entering a block are put in another order (the
class token's new index tracked) and the rest of the model runs unchanged; no token is merged.
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from mambamerge.diagnostics.probe import class_feature_from, class_index, trace


def perturbed_copies(hidden: torch.Tensor, eps: float, generator: torch.Generator, cls_index: int) -> torch.Tensor:
    """Copies of one sequence, copy i with non-class token i nudged by eps times its own norm in a random
    direction. hidden: (L, D) -> (L - 1, L, D), copies in token order (the class token skipped)."""
    length = hidden.shape[0]
    tokens = torch.tensor([t for t in range(length) if t != cls_index])
    noise = torch.randn(length - 1, hidden.shape[1], generator=generator, dtype=hidden.dtype).to(hidden.device)
    noise = noise / noise.norm(dim=1, keepdim=True) * eps * hidden[tokens].norm(dim=1, keepdim=True)
    copies = hidden[None].repeat(length - 1, 1, 1)
    copies[torch.arange(length - 1), tokens] += noise
    return copies


def perturbation_curve(model, images: torch.Tensor, block: int = 0, scope: str = "model", eps: float = 0.1,
                       seed: int = 0, chunk: int = 64) -> Dict[str, torch.Tensor]:
    """Relative change of the class token's output when one token entering `block` is nudged.

    scope "model": the final normalised class feature; "block": that block's own output at the class
    token (one block's dependence). The nudge is added to the sum of the two streams the block reads.
    images (B, C, H, W). Returns {"distance": (L - 1,) signed t - cls, "change": (B, L - 1)}."""
    if scope not in ("model", "block"):
        raise ValueError(f"scope must be 'model' or 'block', got {scope!r}")
    cls = class_index(model)
    generator = torch.Generator().manual_seed(seed)
    layer = model.layers[block]
    rows = []
    with torch.inference_mode():
        tr = trace(model, images)
        hidden, residual = tr.hidden[block], tr.residual[block]
        summed = hidden if residual is None else residual + hidden
        for b in range(summed.shape[0]):
            copies = perturbed_copies(summed[b], eps, generator, cls)
            if scope == "model":
                reference = class_feature_from(model, summed[b:b + 1], None, block, cls)[0]
                run = lambda part: class_feature_from(model, part, None, block, cls)  # noqa: E731
            else:
                reference = layer(summed[b:b + 1], None)[0][0, cls]
                run = lambda part: layer(part, None)[0][:, cls]  # noqa: E731
            moved = torch.cat([run(copies[i:i + chunk]) for i in range(0, copies.shape[0], chunk)])
            rows.append((moved - reference).norm(dim=1) / reference.norm())
    length = summed.shape[1]
    distance = torch.tensor([t - cls for t in range(length) if t != cls])
    return {"distance": distance, "change": torch.stack(rows)}


def _keep_class(order: torch.Tensor, cls_index: int) -> torch.Tensor:
    """Put the class token back in its slot in a permutation of all L tokens."""
    order = order[order != cls_index]
    return torch.cat((order[:cls_index], torch.tensor([cls_index]), order[cls_index:]))


def token_orders(length: int, cls_index: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Named permutations (L,) of the tokens, new position -> old index.

    identity; reverse (the whole sequence flipped, the two scans swap roles); random (all tokens but the
    class token, which keeps its slot); local (random within consecutive blocks of 4, class token kept);
    even_odd (ToMe's output order: even indices, then odd ones; the class token moves with them)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.arange(length)
    local = torch.cat([chunk[torch.randperm(len(chunk), generator=generator)] for chunk in index.split(4)])
    return {"identity": index, "reverse": index.flip(0),
            "random": _keep_class(torch.randperm(length, generator=generator), cls_index),
            "local": _keep_class(local, cls_index),
            "even_odd": torch.cat((index[0::2], index[1::2]))}


def order_effect(model, images: torch.Tensor, labels: torch.Tensor, block: int = 0,
                 orders: Sequence[str] = ("identity", "reverse", "local", "random", "even_odd"), seed: int = 0,
                 batch: int = 64) -> Dict[str, Dict[str, float]]:
    """Top-1, agreement with the dense prediction and mean KL(dense || reordered) when the tokens
    entering `block` are reordered. images (B, C, H, W), labels (B,)."""
    cls = class_index(model)
    perms = {}
    results: Dict[str, Dict[str, list]] = {}
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch):
            tr = trace(model, images[start:start + batch])
            hidden, residual = tr.hidden[block], tr.residual[block]
            if not perms:
                perms = token_orders(hidden.shape[1], cls, seed)
            dense = F.log_softmax(tr.logits.double(), -1)
            for name in orders:
                if name not in perms:
                    raise ValueError(f"unknown token order {name!r}; known: {', '.join(perms)}")
                perm = perms[name].to(hidden.device)
                new_cls = int((perm == cls).nonzero())
                moved = class_feature_from(model, hidden[:, perm], None if residual is None else residual[:, perm],
                                           block, new_cls)
                log_q = F.log_softmax(model.head(moved).double(), -1)
                entry = results.setdefault(name, {"correct": [], "agree": [], "kl": []})
                entry["correct"].append(log_q.argmax(-1).cpu() == labels[start:start + batch].cpu())
                entry["agree"].append((log_q.argmax(-1) == dense.argmax(-1)).cpu())
                entry["kl"].append((dense.exp() * (dense - log_q)).sum(-1).cpu())
    return {name: {"top1": float(torch.cat(r["correct"]).float().mean()),
                   "agreement": float(torch.cat(r["agree"]).float().mean()),
                   "kl": float(torch.cat(r["kl"]).mean())} for name, r in results.items()}


def side_summary(distance: torch.Tensor, change: torch.Tensor, at: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)
                 ) -> Dict[str, Dict[int, float]]:
    """Mean relative change at chosen |distances|, left and right of the class token (absent where the
    sequence is shorter). distance (n,), change (B, n)."""
    mean = change.mean(0)
    out: Dict[str, Dict[int, float]] = {"left": {}, "right": {}}
    for side, sign in (("left", -1), ("right", 1)):
        for k in at:
            hit = distance == sign * k
            if bool(hit.any()):
                out[side][k] = float(mean[hit][0])
    return out
