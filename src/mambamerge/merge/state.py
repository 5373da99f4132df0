"""Bookkeeping shared by every token-reduction method.

A method looks at the tokens between two blocks and returns a `MergePlan`: which old token each new
token takes its slot from, and where every old token goes (merged into a survivor, or dropped).
`TokenState.apply` then carries that one plan through every stream — hidden, residual, sizes,
original positions, the class-token index and, optionally, the source map — so the streams can never
disagree.
"""
import functools
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch

DROP = -1


def _flat_rows(index: torch.Tensor, length: int) -> torch.Tensor:
    """(B, K) row indices per batch element -> (B*K,) indices into the flattened (B*length) rows."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * length).reshape(-1)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of each batch element: x (B, L, C), index (B, K) -> (B, K, C), x[b, index[b, k]].
    Row operations on the flattened batch are much faster than gather/scatter with expanded indices."""
    batch, length, channels = x.shape
    return x.reshape(batch * length, channels).index_select(0, _flat_rows(index, length)).view(
        batch, index.shape[1], channels)


@dataclass(frozen=True)
class MergePlan:
    """One reduction step for a batch.

    rep:    (B, L') long, the old index whose slot (position, and value if nothing merges into it) each
            new token takes, in output order.
    assign: (B, L) long, the new index each old token goes to, or DROP (-1) for pruned tokens.
    weight: (B, L) float, the weight of each old token in the average of the new token it joins.
    mode:   "mean" -> sum_j w_j x_j / sum_j w_j; "sum" -> sum_j w_j x_j / w_rep (a weighted sum
            normalised by the token that keeps the slot).
    movers: (B, m) the kept tokens that are not their new token's rep; derived from assign and rep
            when not given.
    """

    rep: torch.Tensor
    assign: torch.Tensor
    weight: torch.Tensor
    mode: str = "mean"
    movers: Optional[torch.Tensor] = None

    @property
    def new_length(self) -> int:
        return self.rep.shape[1]

    def with_slots_at(self, key: torch.Tensor) -> "MergePlan":
        """Move every new token to the slot of its member with the largest key, keeping slots in
        ascending old-index order. key: (B, L). Values are unchanged; positions and order follow."""
        batch, length = self.assign.shape
        kept = self.assign != DROP
        index = self.assign.clamp(min=0)
        key = torch.where(kept, key.float(), torch.full_like(key, float("-inf"), dtype=torch.float32))
        best = torch.full((batch, self.new_length), float("-inf"), device=key.device)
        best = best.scatter_reduce(1, index, key, "amax")
        is_best = kept & (key == best.gather(1, index))
        old = torch.arange(length, device=key.device).expand(batch, -1)
        rep = torch.full((batch, self.new_length), length, dtype=torch.long, device=key.device)
        rep = rep.scatter_reduce(1, index, torch.where(is_best, old, length), "amin")
        order = rep.argsort(dim=1)
        rank = order.argsort(dim=1)
        assign = torch.where(kept, rank.gather(1, index), self.assign)
        return MergePlan(rep=rep.gather(1, order), assign=assign, weight=self.weight, mode=self.mode)

    def __post_init__(self):
        if self.movers is None:
            object.__setattr__(self, "movers", self._find_movers())

    def _find_movers(self) -> torch.Tensor:
        """(B, m) old indices of tokens merged into another token's slot (kept, but not the rep of
        their new token); rows with fewer movers are padded with their first rep, at weight zero."""
        kept = self.assign != DROP
        old = torch.arange(self.assign.shape[1], device=self.assign.device)
        mask = kept & (old[None, :] != self.rep.gather(1, self.assign.clamp(min=0)))
        width = int(mask.sum(dim=1).max()) if mask.numel() else 0
        rank = torch.cumsum(mask, dim=1) - 1
        slots = torch.where(mask, rank, width)  # unused slots go to a column that is cut off below
        out = self.rep[:, :1].expand(-1, width + 1).clone()
        out.scatter_(1, slots, old.expand_as(slots))
        return out[:, :width]

    def _merge_rows(self, dtype: torch.dtype):
        """Everything `combine` needs that does not depend on the stream, for streams of `dtype`:
        flat row indices of the reps, of the rows receiving merges (dst, one per mover) and of the
        movers, and the scales: a receiving row becomes rep * w_rep / denom + sum of mover * w / denom."""
        batch, length = self.assign.shape
        movers = self.movers
        kept = self.assign != DROP
        w = torch.where(kept, self.weight, torch.zeros_like(self.weight)).to(dtype)
        w_mov = w.gather(1, movers).masked_fill(movers == self.rep[:, :1], 0)  # (B, m); padding weighs 0
        dst = self.assign.gather(1, movers)  # (B, m) new index each mover joins
        w_rep = w.gather(1, self.rep)  # (B, L')
        denom = w_rep.scatter_add(1, dst, w_mov) if self.mode == "mean" else w_rep
        denom = denom.clamp(min=torch.finfo(dtype).tiny).gather(1, dst)
        return (_flat_rows(self.rep, length), _flat_rows(dst, self.new_length),
                _flat_rows(self.rep.gather(1, dst), length), _flat_rows(movers, length),
                (w_rep.gather(1, dst) / denom).reshape(-1, 1), (w_mov / denom).reshape(-1, 1))

    def combine(self, *streams: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Apply the plan to streams of shape (B, L, C_i) -> (B, L', C_i) each.

        A new token with a single member is that member, bit for bit; only the rows that receive
        merges are recomputed (weighted average, or weighted sum for mode "sum")."""
        batch, length = self.assign.shape
        dtype = functools.reduce(torch.promote_types, (x.dtype for x in streams), torch.float32)
        rep, dst, rep_of_dst, movers, scale_rep, scale_mov = self._merge_rows(dtype)
        outs = []
        for x in streams:
            flat = x.reshape(batch * length, x.shape[2])
            out = flat.index_select(0, rep)
            if movers.numel():
                # rows receiving several movers are rescaled once per mover, to the same value
                out.index_copy_(0, dst, flat.index_select(0, rep_of_dst) * scale_rep.to(x.dtype))
                out.index_add_(0, dst, flat.index_select(0, movers) * scale_mov.to(x.dtype))
            outs.append(out.view(batch, self.new_length, x.shape[2]))
        return tuple(outs)

    def add_up(self, x: torch.Tensor) -> torch.Tensor:
        """Sum members per new token (sizes, source maps). x: (B, L) or (B, L, K) -> (B, L', ...)."""
        kept = (self.assign != DROP).to(x.dtype)
        index = self.assign.clamp(min=0)
        if x.ndim == 2:
            return torch.zeros(x.shape[0], self.new_length, dtype=x.dtype, device=x.device).scatter_add_(
                1, index, x * kept)
        out = torch.zeros(x.shape[0], self.new_length, x.shape[2], dtype=x.dtype, device=x.device)
        return out.scatter_add_(1, index[..., None].expand(-1, -1, x.shape[2]), x * kept[..., None])


@dataclass(frozen=True)
class TokenState:
    """The token sequence between two blocks.

    hidden, residual: (B, L, D) the two streams of the residual blocks.
    size:      (B, L) float, number of original tokens each token holds (the class token holds itself).
    pos:       (B, L) long, index in the embedded sequence of the slot each token sits in.
    cls_index: (B,) long, where the class token is now.
    source:    (B, L, L0) or None, 1 where token i holds original token j (for visualisation).
    """

    hidden: torch.Tensor
    residual: Optional[torch.Tensor]
    size: torch.Tensor
    pos: torch.Tensor
    cls_index: torch.Tensor
    source: Optional[torch.Tensor] = None

    @classmethod
    def start(cls, tokens: torch.Tensor, cls_index: int, track_source: bool = False) -> "TokenState":
        """State of freshly embedded tokens (B, L0, D) with the class token at cls_index."""
        batch, length, _ = tokens.shape
        dev = tokens.device
        source = None
        if track_source:
            source = torch.eye(length, device=dev).expand(batch, -1, -1).clone()
        return cls(hidden=tokens, residual=None, size=torch.ones(batch, length, device=dev),
                   pos=torch.arange(length, device=dev).expand(batch, -1).clone(),
                   cls_index=torch.full((batch,), cls_index, dtype=torch.long, device=dev), source=source)

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    def cls_mask(self) -> torch.Tensor:
        """(B, L) bool, True at the class token."""
        return torch.arange(self.length, device=self.hidden.device)[None, :] == self.cls_index[:, None]

    def with_streams(self, hidden: torch.Tensor, residual: torch.Tensor) -> "TokenState":
        return replace(self, hidden=hidden, residual=residual)

    def apply(self, plan: MergePlan) -> "TokenState":
        """The same plan on every stream."""
        if self.residual is None:
            (hidden,), residual = plan.combine(self.hidden), None
        else:
            hidden, residual = plan.combine(self.hidden, self.residual)
        return TokenState(
            hidden=hidden,
            residual=residual,
            size=plan.add_up(self.size),
            pos=self.pos.gather(1, plan.rep),
            cls_index=plan.assign.gather(1, self.cls_index[:, None])[:, 0],
            source=None if self.source is None else plan.add_up(self.source),
        )


def plan_from_selection(length: int, src: torch.Tensor, dst: Optional[torch.Tensor], weight: torch.Tensor,
                        order: Optional[torch.Tensor] = None, mode: str = "mean") -> MergePlan:
    """Build a plan from the tokens that leave.

    length: L, tokens now. src: (B, r) indices of tokens that leave. dst: (B, r) the surviving token each
    one merges into, or None to drop them (pruning). weight: (B, L). order: (B, L - r) optional
    permutation of the survivors (default: they keep their current relative order).
    """
    batch, r = src.shape
    device = src.device
    keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    keep.scatter_(1, src, False)
    survivors = torch.arange(length, device=device).expand(batch, -1)[keep].view(batch, length - r)
    if order is not None:
        survivors = survivors.gather(1, order)
    assign = torch.full((batch, length), DROP, dtype=torch.long, device=device)
    assign.scatter_(1, survivors, torch.arange(length - r, device=device).expand(batch, -1))
    if dst is None:
        return MergePlan(rep=survivors, assign=assign, weight=weight, mode=mode, movers=src[:, :0])
    assign.scatter_(1, src, assign.gather(1, dst))
    return MergePlan(rep=survivors, assign=assign, weight=weight, mode=mode, movers=src)
