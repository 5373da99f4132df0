"""Running under `torchrun`: process group set-up, which share of the data a process takes, and sums
over processes. Without torchrun (no WORLD_SIZE in the environment, or 1) everything here is the
single-process identity, so callers never branch on it.

Backends: NCCL for CUDA devices, gloo for CPU. Each process of a CUDA run takes the GPU of its
LOCAL_RANK.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", 1))
    if size <= 1:
        return World()
    return World(int(env["RANK"]), size, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)))


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (once) and return this process's device: `device`
    itself, or for CUDA under torchrun the GPU of its LOCAL_RANK (cuda:N given explicitly is refused
    there: every process would share one GPU)."""
    here = world()
    if not here.active:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device} under torchrun: give --device cuda, each process then takes the "
                             f"GPU of its LOCAL_RANK")
        if here.local_rank >= torch.cuda.device_count():
            raise ValueError(f"torchrun started {here.local_size} processes on this machine but it has "
                             f"{torch.cuda.device_count()} GPUs; pass --nproc_per_node {torch.cuda.device_count()}")
        device = torch.device("cuda", here.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_all(values, device: torch.device) -> list:
    """Element-wise sum of a list of numbers over all processes (float64)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def union_all(items: set) -> set:
    """Add to `items`, in place, what every other process holds in its own (strings, e.g. the names of
    unreadable images each met in its share of the data); returns it."""
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(items))
        for part in gathered:
            items.update(part)
    return items


def shard(n: int, here: World) -> range:
    """Indices 0..n-1 of this process for evaluation: every index in exactly one process (strided, so
    shares differ by at most one; no padding, hence no image counted twice)."""
    return range(here.rank, n, here.size)
