"""The merge plan: one reduction step as a map from the old tokens to the new ones.

A method decides which tokens leave and where they go; `plan_from_selection` (the one public
constructor) turns that into a `MergePlan`, which `TokenState.apply` (state.py) carries through every
stream. `combine` and `merge_tokens` apply it to a stream, `add_up` to counts.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from mambamerge.ops import cpu_kernels

DROP = -1


def _flat(index: torch.Tensor, length: int) -> torch.Tensor:
    """(B, K) row indices per batch element -> (B*K,) indices into the flattened (B*length) rows."""
    batch = index.shape[0]
    base = torch.arange(0, batch * length, length, device=index.device)
    return (index + base[:, None]).reshape(-1)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of each batch element: x (B, L, C), index (B, K) -> (B, K, C), x[b, index[b, k]].
    Row operations on the flattened batch are much faster than gather/scatter with expanded indices."""
    batch, length, channels = x.shape
    return x.reshape(batch * length, channels).index_select(0, _flat(index, length)).view(
        batch, index.shape[1], channels)


def checks_values(t: torch.Tensor) -> bool:
    """Whether a check that reads the values of `t` runs: in eager mode on CPU tensors. On a GPU reading a
    value stops the host until the device has caught up (a sync, which also rules out CUDA-graph capture),
    and under torch.compile it splits the graph; there the checks are skipped, the schedule having been
    checked against each method's capacity when it was resolved."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Where each row of mask is True, ascending: mask (B, L) bool with `count` True entries in every row
    -> (B, count) long. A stable sort rather than nonzero() or boolean indexing, so the output shape
    does not depend on the data and torch.compile captures it in one graph."""
    return (~mask).to(torch.uint8).argsort(dim=1, stable=True)[:, :count]


@dataclass(frozen=True)
class MergePlan:
    """One reduction step for a batch.

    rep:     (B, L') long, the old index whose slot (position, and value if nothing merges into it)
             each new token takes, in output order.
    assign:  (B, L) long, the new index each old token goes to, or DROP (-1) for pruned tokens.
    weight:  (B, L) float, the weight of each old token in the average of the new token it joins.
    movers:  (B, m) long, the kept tokens that are not their new token's rep (the same count m in
             every row: each row removes the same number of tokens).
    targets: (B, m) long, the rep (old index) of the token each mover joins.
    mode:    "mean" -> sum_j w_j x_j / sum_j w_j; "sum" -> sum_j w_j x_j / w_rep (a weighted sum
             normalised by the token that keeps the slot).
    """

    rep: torch.Tensor
    assign: torch.Tensor
    weight: torch.Tensor
    movers: torch.Tensor
    targets: torch.Tensor
    mode: str = "mean"

    @property
    def new_length(self) -> int:
        return self.rep.shape[1]

    def with_slots_at(self, key: torch.Tensor) -> "MergePlan":
        """Move every new token to the slot of its member with the largest key, keeping slots in
        ascending old-index order. key: (B, L). Values are unchanged; positions and order follow.
        For plans that drop nothing (every old token joins a new one)."""
        batch, length = self.assign.shape
        if checks_values(self.assign) and bool((self.assign == DROP).any()):
            raise ValueError("with_slots_at needs a plan that drops no token")
        key = key.float()
        best = torch.full((batch, self.new_length), float("-inf"), device=key.device)
        best = best.scatter_reduce(1, self.assign, key, "amax")
        is_best = key == best.gather(1, self.assign)
        old = torch.arange(length, device=key.device).expand(batch, -1)
        rep = torch.full((batch, self.new_length), length, dtype=torch.long, device=key.device)
        rep = rep.scatter_reduce(1, self.assign, torch.where(is_best, old, length), "amin")
        order = rep.argsort(dim=1)
        assign = order.argsort(dim=1).gather(1, self.assign)
        rep = rep.gather(1, order)
        movers = true_indices(old != rep.gather(1, assign), length - self.new_length)
        return MergePlan(rep=rep, assign=assign, weight=self.weight, movers=movers,
                         targets=rep.gather(1, assign.gather(1, movers)), mode=self.mode)

    def combine(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the plan to a stream (B, L, C) -> (B, L', C).

        A new token with a single member is that member, bit for bit; only the rows that receive
        merges are recomputed: rep * w_rep / denom + sum of movers * w / denom, with denom the sum of
        the members' weights ("mean") or w_rep ("sum")."""
        batch, length, channels = x.shape
        flat = x.reshape(batch * length, channels)
        out = flat.index_select(0, _flat(self.rep, length))
        if self.movers.shape[1] == 0:
            return out.view(batch, self.new_length, channels)
        dtype = torch.promote_types(x.dtype, torch.float32)
        w = self.weight.to(dtype)
        w_mov = w.gather(1, self.movers)  # (B, m)
        w_dst = w.gather(1, self.targets)  # (B, m) the weight of the rep each mover joins
        denom = w.scatter_add(1, self.targets, w_mov) if self.mode == "mean" else w
        denom = denom.gather(1, self.targets).clamp(min=torch.finfo(dtype).tiny)
        targets = _flat(self.targets, length)
        receivers = _flat(self.assign.gather(1, self.targets), self.new_length)
        # rows receiving several movers are rescaled once per mover, to the same value
        out.index_copy_(0, receivers, flat.index_select(0, targets) * (w_dst / denom).to(x.dtype).view(-1, 1))
        out.index_add_(0, receivers, flat.index_select(0, _flat(self.movers, length))
                       * (w_mov / denom).to(x.dtype).view(-1, 1))
        return out.view(batch, self.new_length, channels)

    def merge_tokens(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], size: torch.Tensor):
        """The plan applied to residual + hidden (hidden alone when residual is None), (B, L, C) -> (B, L', C),
        and to the token sizes, (B, L) -> (B, L'). One call to the CPU kernel where it takes the inputs
        (cpu_kernels.can_merge; about 35 small torch operations fewer per step); elsewhere `combine` on
        the sum and `add_up`."""
        if cpu_kernels.can_merge(hidden, residual, size):
            return cpu_kernels.merge_apply(hidden, residual, size, self.rep, self.assign, self.movers, self.targets,
                                           self.weight, self.mode == "mean")
        return self.combine(hidden if residual is None else residual + hidden), self.add_up(size)

    def add_up(self, x: torch.Tensor) -> torch.Tensor:
        """Sum members per new token (sizes, source maps). x: (B, L) or (B, L, K) -> (B, L', ...)."""
        kept = (self.assign != DROP).to(x.dtype)
        index = self.assign.clamp(min=0)
        if x.ndim == 2:
            return torch.zeros(x.shape[0], self.new_length, dtype=x.dtype, device=x.device).scatter_add_(
                1, index, x * kept)
        out = torch.zeros(x.shape[0], self.new_length, x.shape[2], dtype=x.dtype, device=x.device)
        return out.scatter_add_(1, index[..., None].expand(-1, -1, x.shape[2]), x * kept[..., None])


def plan_from_selection(length: int, src: torch.Tensor, dst: Optional[torch.Tensor], weight: torch.Tensor,
                        order: Optional[torch.Tensor] = None, mode: str = "mean") -> MergePlan:
    """Build a plan from the tokens that leave.

    length: L, tokens now. src: (B, r) indices of tokens that leave. dst: (B, r) the surviving token each
    one merges into, or None to drop them (pruning). weight: (B, L). order: (B, L - r) optional
    permutation of the survivors (default: they keep their current relative order).
    """
    batch, r = src.shape
    device = src.device
    if order is None and cpu_kernels.can_plan(src):
        survivors, assign = cpu_kernels.plan_from_selection(src, dst, length)
    else:
        keep = torch.ones(batch, length, dtype=torch.bool, device=device).scatter_(1, src, False)
        survivors = true_indices(keep, length - r)
        if order is not None:
            survivors = survivors.gather(1, order)
        assign = torch.full((batch, length), DROP, dtype=torch.long, device=device)
        assign.scatter_(1, survivors, torch.arange(length - r, device=device).expand(batch, -1))
        if dst is not None:
            assign.scatter_(1, src, assign.gather(1, dst))
    if dst is None:
        return MergePlan(rep=survivors, assign=assign, weight=weight, movers=src[:, :0], targets=src[:, :0],
                         mode=mode)
    return MergePlan(rep=survivors, assign=assign, weight=weight, movers=src, targets=dst, mode=mode)
