"""Choosing a merge step's tokens in one kernel call at inference: MaMe's sources and their match, the
bipartite match of ToMe and R-MeeTo, STM's adjacent pairs (select_* in kernels.cpp). Each returns src
(B, r), the tokens that leave, and dst (B, r), the token each joins, as the torch functions they stand
for (mambamerge.merge: matching.py, tome.py, stm.py) do; those stay the path for training, GPUs and
options the kernels do not cover."""
from typing import Optional, Tuple

import torch

from mambamerge.ops.cpu_kernels.blas import gemm_address, gemm_found
from mambamerge.ops.cpu_kernels.library import address, call, handles
from mambamerge.ops.cpu_kernels.registration import dispatch, register

Pair = Tuple[torch.Tensor, torch.Tensor]


def _outputs(feat: torch.Tensor, r: int) -> Pair:
    return (feat.new_empty(feat.shape[0], r, dtype=torch.long), feat.new_empty(feat.shape[0], r, dtype=torch.long))


def _mame(feat: torch.Tensor, cls_index: Optional[torch.Tensor], score: Optional[torch.Tensor], width: int,
          reach: int, r: int, least: bool) -> Pair:
    feat = feat.contiguous()
    cls_index = None if cls_index is None else cls_index.contiguous()
    score = None if score is None else score.to(torch.float32).contiguous()
    if least and score is None:
        raise ValueError("select_mame: the r least-scoring sources need a score")
    src, dst = _outputs(feat, r)
    batch, length, dim = feat.shape
    if call("mm_select_mame", feat.dtype, feat.data_ptr(), address(cls_index), address(score), src.data_ptr(),
            dst.data_ptr(), gemm_address(feat.dtype), batch, length, dim, width, reach, r, int(least)) != 0:
        raise MemoryError("selection kernel failed to allocate its buffers")
    return src, dst


def _bipartite(feat: torch.Tensor, protected: torch.Tensor, penalty: Optional[torch.Tensor], r: int) -> Pair:
    feat, protected = feat.contiguous(), protected.to(torch.bool).contiguous()  # read as one byte a token
    penalty = None if penalty is None else penalty.to(feat.dtype).contiguous()
    src, dst = _outputs(feat, r)
    batch, length, dim = feat.shape
    if call("mm_select_bipartite", feat.dtype, feat.data_ptr(), protected.data_ptr(), address(penalty),
            src.data_ptr(), dst.data_ptr(), gemm_address(feat.dtype), batch, length, dim, r) != 0:
        raise MemoryError("selection kernel failed to allocate its buffers")
    return src, dst


def _adjacent(feat: torch.Tensor, cls_index: torch.Tensor, w_protect: int, r: int, fading: float,
              gamma: float) -> Pair:
    feat, cls_index = feat.contiguous(), cls_index.contiguous()
    src, dst = _outputs(feat, r)
    batch, length, dim = feat.shape
    status = call("mm_select_adjacent", feat.dtype, feat.data_ptr(), cls_index.data_ptr(), src.data_ptr(),
                  dst.data_ptr(), batch, length, dim, w_protect, r, fading, gamma)
    if status == 2:
        raise ValueError(f"stm: {r} merges asked, but a side of the class token has fewer adjacent pairs outside "
                         f"the protected window (w_protect={w_protect}); lower the reduction or w_protect")
    if status != 0:
        raise MemoryError("selection kernel failed to allocate its buffers")
    return src, dst


_MAME = register("select_mame", _mame, lambda feat, cls_index, score, width, reach, r, least: _outputs(feat, r))
_BIPARTITE = register("select_bipartite", _bipartite, lambda feat, protected, penalty, r: _outputs(feat, r))
_ADJACENT = register("select_adjacent", _adjacent,
                     lambda feat, cls_index, w_protect, r, fading, gamma: _outputs(feat, r))


def can_select(feat: torch.Tensor) -> bool:
    """True when the selection kernels take the features feat (B, L, D): CPU float32/float64 that need no
    gradient (training keeps the torch path), the library loaded and torch's gemm_ for the dtype found."""
    if torch.is_grad_enabled() and feat.requires_grad:
        return False
    return handles(feat) and gemm_found(feat.dtype)


def select_mame(feat, cls_index, score, width: int, reach: int, r: int, least: bool = False) -> Pair:
    """MaMe's sources and match in one call. The tokens outside the class token's window of `width`
    (cls_index (B,) long, or None: no class token) give r sources: with `least` the r lowest-scoring
    (score (B, L), lowest first, as MaMe's least_delta, most_delta and random sources rank theirs); else
    they are cut into r equal runs and of each the first (score None: matching.uniform_sources) or the
    lowest-scoring (spread_sources) leaves. Each joins its most cosine-similar token that neither leaves
    nor lies in the window (most_similar without a cap): within `reach` positions where one such token is
    (match="window"), anywhere with reach 0. feat (B, L, D)."""
    return dispatch(_MAME, _mame, (feat, cls_index, score, int(width), int(reach), int(r), bool(least)))


def select_bipartite(feat, protected, penalty, r: int) -> Pair:
    """tome.bipartite_match without a scope: feat (B, L, D), protected (B, L) bool, penalty (B, L) or None."""
    return dispatch(_BIPARTITE, _bipartite, (feat, protected, penalty, int(r)))


def select_adjacent(feat, cls_index, w_protect: int, r: int, fading: float, gamma: float) -> Pair:
    """STM's choice of adjacent pairs with scope "free" (stm.STM.plan): feat (B, L, D), cls_index (B,) long."""
    return dispatch(_ADJACENT, _adjacent, (feat, cls_index, int(w_protect), int(r), float(fading), float(gamma)))
