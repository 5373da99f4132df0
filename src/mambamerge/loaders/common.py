"""Helpers shared by the family loaders: the mixer's hyper-parameters from its tensors, the depth."""
import re
from typing import Dict

import torch


def depth_of(sd: Dict[str, torch.Tensor]) -> int:
    indices = [int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))]
    if not indices:
        raise ValueError("the file has no blocks (no layers.{i}.* keys)")
    return 1 + max(indices)


def mixer_config(sd: Dict[str, torch.Tensor], embed_dim: int) -> dict:
    """d_state, d_conv, expand, dt_rank of block 0's mixer."""
    d_inner = sd["layers.0.mixer.in_proj.weight"].shape[0] // 2
    if d_inner % embed_dim:
        raise ValueError(f"in_proj has {2 * d_inner} outputs, not a multiple of 2 x embed_dim={embed_dim}")
    return dict(d_state=sd["layers.0.mixer.A_log"].shape[1], d_conv=sd["layers.0.mixer.conv1d.weight"].shape[-1],
                expand=d_inner // embed_dim, dt_rank=sd["layers.0.mixer.dt_proj.weight"].shape[1])


def require(sd: Dict[str, torch.Tensor], keys, family: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"not a complete {family} checkpoint: missing {', '.join(missing)}")
