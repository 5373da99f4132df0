"""Prune versus merge of the same selected tokens: is the damage in which tokens leave, or in how they
are merged?

`PruneInstead` wraps a method: each step it asks the method for its plan and drops every token that
does not keep a slot in it (merged into another token, or dropped already) instead of merging it; the
survivors keep their sequence order. Run beside the
method itself on the same images and schedule, the two differ only in merging versus dropping.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from mambamerge.diagnostics.wrapper import MethodWrapper
from mambamerge.merge.plan import MergePlan, plan_from_selection
from mambamerge.merge.state import TokenState
from mambamerge.tokens import SSMStats
from mambamerge.patch import patch, unpatch


class PruneInstead(MethodWrapper):
    """A method's own selection, the leaving tokens dropped instead of merged."""

    def plan(self, state: TokenState, ssm: Optional[SSMStats], r: int) -> MergePlan:
        merged = self.method.plan(state, ssm, r)
        batch, length = merged.assign.shape
        leaving = torch.ones(batch, length, dtype=torch.bool, device=merged.rep.device).scatter_(1, merged.rep, False)
        return plan_from_selection(length, leaving.nonzero()[:, 1].view(batch, length - merged.new_length), None,
                                   state.size)


def _scores(model, images: torch.Tensor, labels: torch.Tensor, dense_log_p: torch.Tensor, batch: int) -> dict:
    """Top-1 and mean KL(dense || model) over images (N, C, H, W); dense_log_p (N, classes)."""
    correct, kl = [], []
    for start in range(0, images.shape[0], batch):
        log_q = F.log_softmax(model(images[start:start + batch]).double(), -1)
        log_p = dense_log_p[start:start + batch]
        correct.append(log_q.argmax(-1).cpu() == labels[start:start + batch].cpu())
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1).cpu())
    return {"top1": float(torch.cat(correct).float().mean()), "kl": float(torch.cat(kl).mean())}


def prune_vs_merge(model, images: torch.Tensor, labels: torch.Tensor, configs: Dict[str, dict],
                   reductions: Sequence[float], batch: int = 64) -> Dict[str, object]:
    """For each named config {"method": name, **options} and target reduction: top-1 and mean KL to the
    dense model with the method as it is ("merge") and with its selections dropped ("prune").

    images (N, C, H, W), labels (N,). Returns {"dense": {"top1"}, "rows": [{config, method, options,
    reduction, merge: {top1, kl}, prune: {top1, kl}}]}. The model is left unpatched."""
    unpatch(model)
    rows = []
    with torch.inference_mode():
        dense = torch.cat([model(images[s:s + batch]) for s in range(0, images.shape[0], batch)])
        dense_log_p = F.log_softmax(dense.double(), -1)
        try:
            for label, config in configs.items():
                options = {k: v for k, v in config.items() if k != "method"}
                for reduction in reductions:
                    row = {"config": label, "method": config["method"], "options": options, "reduction": reduction}
                    for mode in ("merge", "prune"):
                        patch(model, config["method"], reduction=reduction, **options)
                        if mode == "prune":
                            model.token_reducer.method = PruneInstead(model.token_reducer.method)
                        row[mode] = _scores(model, images, labels, dense_log_p, batch)
                    rows.append(row)
        finally:
            unpatch(model)
    top1 = float((dense.argmax(-1).cpu() == labels.cpu()).float().mean())
    return {"dense": {"top1": top1}, "rows": rows}
