"""Run a model's blocks, reducing tokens between them: the one merge path of every model family.

A family supplies its blocks (each `block(hidden, residual, return_ssm=...)` returning the next
(hidden, residual) and, when asked, the mixer's SSMStats, with a `drop_path` on its residual branch)
and the layout of its embedded tokens; it holds no merging code itself.

Between two blocks a model carries two streams, `residual` and the last block's output `hidden`, and
the next block starts with residual + drop_path(hidden). A reduction step merges that sum once
(merge/state.py), so the next block's stochastic depth is applied here, before the merge, where its
addition now happens.
"""
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from mambamerge.merge.reducer import TokenReducer
from mambamerge.merge.state import TokenState
from mambamerge.tokens import TokenLayout


class BlockOutput(NamedTuple):
    """The two streams after the last block, (B, L, D) each, where the class token is: an int for
    every image (dense), a (B,) long tensor (reduced), or None (no class token); and, with a reducer,
    the tokens' final bookkeeping (sizes, original positions, source map)."""

    hidden: torch.Tensor
    residual: torch.Tensor
    cls_index: Union[None, int, torch.Tensor]
    state: Optional[TokenState] = None


def run_blocks(layers: Sequence[nn.Module], tokens: torch.Tensor, layout: TokenLayout,
               reducer: Optional[TokenReducer] = None) -> BlockOutput:
    """tokens (B, layout.length, D) through every block; with a reducer, tokens leave between blocks as
    its schedule says."""
    if reducer is None:
        hidden, residual = tokens, None
        for block in layers:
            hidden, residual = block(hidden, residual)
        return BlockOutput(hidden, residual, layout.cls_index)
    state = TokenState.start(tokens, layout, track_source=reducer.track_source)
    for i, block in enumerate(layers):
        if reducer.wants_ssm(i):
            hidden, residual, ssm = block(state.hidden, state.residual, return_ssm=True)
        else:
            (hidden, residual), ssm = block(state.hidden, state.residual), None
        if reducer.removal_after(i):
            hidden = layers[i + 1].drop_path(hidden)
        state = reducer.step(i, state.with_streams(hidden, residual), ssm)
    return BlockOutput(state.hidden, state.residual, state.cls_index, state)


def class_feature(features: torch.Tensor, cls_index: Union[int, torch.Tensor]) -> torch.Tensor:
    """features (B, L, D) at the class token: one index for all images, or one per image (B,)."""
    if isinstance(cls_index, int):
        return features[:, cls_index]
    return features[torch.arange(features.shape[0], device=features.device), cls_index]


def class_token_first(features: torch.Tensor, cls_index: Union[int, torch.Tensor]) -> torch.Tensor:
    """features (B, L, D) with each image's class token moved to index 0, the other tokens after it in
    their order: a token-reducing model's forward_features, whose class token sits anywhere."""
    batch, length = features.shape[:2]
    cls = torch.as_tensor(cls_index, device=features.device).expand(batch)[:, None]
    slot = torch.arange(length, device=features.device).expand(batch, -1)
    before = slot - 1
    order = torch.where(slot == 0, cls, before + (before >= cls).long())
    return features.gather(1, order[..., None].expand(-1, -1, features.shape[2]))
