"""Honest timing: warm-up runs discarded, median of several runs, CUDA synchronised."""
import statistics
import time
from typing import Callable, Dict, List

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device="cpu", warmup: int = 1, runs: int = 5) -> List[float]:
    """Seconds of each of `runs` calls of fn after `warmup` discarded ones."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def first_call_seconds(fns: Dict[str, Callable[[], object]], device="cpu") -> Dict[str, float]:
    """Seconds of one call of each function: for torch.compile'd forwards, their compile (the runs
    timed afterwards exclude it)."""
    return {name: time_call(fn, device, warmup=0, runs=1)[0] for name, fn in fns.items()}


def time_interleaved(fns: Dict[str, Callable[[], object]], device="cpu", warmup: int = 1,
                     runs: int = 5) -> Dict[str, float]:
    """Median seconds per call of several functions measured round-robin in one process, so that
    machine noise hits all of them alike. Returns {name: median seconds}."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].extend(time_call(fn, device, warmup=0, runs=1))
    return {name: statistics.median(ts) for name, ts in times.items()}
