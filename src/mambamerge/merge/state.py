"""The token sequence between two blocks, and how a merge plan moves it.

A method looks at the tokens between two blocks and returns a `MergePlan` (plan.py): which old token
each new token takes its slot from, and where every old token goes (merged into a survivor, or
dropped). `TokenState.apply` then carries that one plan through every stream — the residual stream,
sizes, original positions, the class-token index and, optionally, the source map — so they can never
disagree.

Between two blocks a model carries two streams, `residual` and the last block's output `hidden`, and
the next block starts by adding them. A plan is a linear map of the tokens (each new token a fixed
weighted combination of old ones), so applying it to both streams and letting the next block add
them equals applying it once to their sum: `apply` merges the sum, half the work, and hands the next
block a single stream (hidden = the merged sum, residual = None, as for the first block).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from mambamerge.merge.plan import MergePlan
from mambamerge.tokens import TokenLayout


@dataclass(frozen=True)
class TokenState:
    """The token sequence between two blocks.

    hidden, residual: (B, L, D) the two streams between blocks (the last block's output and the
               running sum it normalised); residual None: hidden is the whole stream (the embedded
               tokens, or the merged sum after a reduction step).
    size:      (B, L) float, number of original tokens each token holds (the class token holds itself).
    pos:       (B, L) long, index in the embedded sequence of the slot each token sits in.
    cls_index: (B,) long, where the class token is now; None when the layout has no class token.
    source:    (B, L, L0) or None, 1 where token i holds original token j (for visualisation).
    layout:    the layout of the embedded sequence the state started from.
    """

    hidden: torch.Tensor
    residual: Optional[torch.Tensor]
    size: torch.Tensor
    pos: torch.Tensor
    cls_index: Optional[torch.Tensor]
    source: Optional[torch.Tensor] = None
    layout: Optional[TokenLayout] = None

    @classmethod
    def start(cls, tokens: torch.Tensor, layout: TokenLayout, track_source: bool = False) -> "TokenState":
        """State of freshly embedded tokens (B, L0, D) laid out as `layout`."""
        batch, length, _ = tokens.shape
        if length != layout.length:
            raise ValueError(f"{length} tokens do not fit the layout {layout.describe()} ({layout.length} tokens)")
        dev = tokens.device
        source = None
        if track_source:
            source = torch.eye(length, device=dev).expand(batch, -1, -1).clone()
        cls_index = None
        if layout.cls_index is not None:
            cls_index = torch.full((batch,), layout.cls_index, dtype=torch.long, device=dev)
        return cls(hidden=tokens, residual=None, size=torch.ones(batch, length, device=dev),
                   pos=torch.arange(length, device=dev).expand(batch, -1).clone(), cls_index=cls_index,
                   source=source, layout=layout)

    @property
    def length(self) -> int:
        return self.hidden.shape[1]

    def cls_mask(self) -> torch.Tensor:
        """(B, L) bool, True at the class token (all False without one)."""
        if self.cls_index is None:
            return torch.zeros(self.size.shape, dtype=torch.bool, device=self.size.device)
        return torch.arange(self.length, device=self.hidden.device)[None, :] == self.cls_index[:, None]

    def with_streams(self, hidden: torch.Tensor, residual: torch.Tensor) -> "TokenState":
        # (the constructor, not dataclasses.replace, which reads the fields' list on every call: twice the time)
        return TokenState(hidden, residual, self.size, self.pos, self.cls_index, self.source, self.layout)

    def apply(self, plan: MergePlan) -> "TokenState":
        """The same plan on every stream; the two residual streams are merged as their sum (see the
        module docstring), which the next block takes as its single input stream."""
        tokens, size = plan.merge_tokens(self.hidden, self.residual, self.size)
        return TokenState(
            hidden=tokens,
            residual=None,
            size=size,
            pos=self.pos.gather(1, plan.rep),
            cls_index=None if self.cls_index is None else plan.assign.gather(1, self.cls_index[:, None])[:, 0],
            source=None if self.source is None else plan.add_up(self.source),
            layout=self.layout,
        )
