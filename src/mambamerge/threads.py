"""How many CPU threads the commands use.

torch's OpenMP workers spin-wait at each barrier between ops (libgomp: 300,000 spins by default).
When another process keeps one of the cores busy, a forward at as many threads as cores waits at
every barrier for the worker that is not running, and collapses (3-70x slower on 2 cores).
OMP_WAIT_POLICY=PASSIVE (never spin) softens that (0.72x of one thread's speed instead of 0.36x, in
benchmarks/threads.py) but makes an idle machine 17-50% slower on small
models, whose ops are microseconds apart, and a bounded spin (GOMP_SPINCOUNT) does not prevent the
collapse (benchmarks/threads.py, docs/performance.md). The commands therefore leave OpenMP's waiting
alone and choose the thread count instead: the cores this process may run on that are
free when the command starts (busy time of each core measured over 0.1 s from /proc/stat), at least 1;
--threads N overrides it. At one thread no worker waits at a barrier, so a busy machine costs nothing
beyond the lost core.
"""
import os
import time
from typing import Dict, Optional


def _cpu_times() -> Dict[int, tuple]:
    """{cpu: (busy, total)} jiffies from /proc/stat."""
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in values]
                idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
                times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times


def free_cores(window: float = 0.1) -> int:
    """Cores of this process's affinity set that were free over the next `window` seconds (a core
    half busy counts half; rounded), at least 1. Falls back to the 1-minute load average without
    /proc/stat."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    try:
        before = _cpu_times()
        time.sleep(window)
        after = _cpu_times()
        busy = sum((after[c][0] - before[c][0]) / max(after[c][1] - before[c][1], 1) for c in cores if c in after)
    except (OSError, ValueError, IndexError, KeyError):
        busy = min(os.getloadavg()[0], len(cores))
    return max(1, round(len(cores) - busy))


def openmp_waiting() -> str:
    """How torch's OpenMP workers wait, as set in this process's environment (for reports)."""
    chosen = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
    return ", ".join(chosen) or "OpenMP's default waiting"


def default_threads(requested: Optional[int] = None) -> int:
    """`requested` if given, else the cores free now."""
    return requested if requested else free_cores()
