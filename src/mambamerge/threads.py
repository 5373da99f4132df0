"""How many CPU threads the commands use, and how long torch's OpenMP workers spin.

torch's OpenMP workers spin-wait at each barrier between ops (libgomp: 300,000 spins by default).
When another process keeps one of the cores busy, a forward at as many threads as cores waits at
every barrier for the worker that is not running, and collapses (20-70x slower on 2 cores).
OMP_WAIT_POLICY=PASSIVE (never spin) avoids that but makes an idle machine 17-50% slower on small
models, whose ops are microseconds apart. The commands' defaults avoid both:

- threads: the cores this process may run on that are free when the command starts (busy time of
  each core measured over 0.1 s from /proc/stat), at least 1; --threads N overrides it;
- GOMP_SPINCOUNT=SPINCOUNT (set before torch loads, by `mambamerge` and `python -m mambamerge`,
  unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set already): a worker spins for a few microseconds, long
  enough to catch the next op on an idle machine, then sleeps instead of holding a core.

No torch import here: bound_spinning() must run before torch loads.
"""
import os
import sys
import time
from typing import Dict, Optional

SPINCOUNT = 10000


def bound_spinning() -> None:
    """Set GOMP_SPINCOUNT=SPINCOUNT for torch's OpenMP runtime, unless torch is loaded already or the
    user chose a waiting policy."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = str(SPINCOUNT)


def bound_spinning_for_commands() -> None:
    """bound_spinning() when this process is the `mambamerge` command or `python -m mambamerge` (called
    by the package on import, before it loads torch); library users keep their own settings."""
    argv = getattr(sys, "orig_argv", sys.argv)
    if os.path.basename(sys.argv[0]) == "mambamerge" or any(
            a == "-m" and b == "mambamerge" for a, b in zip(argv, argv[1:])):
        bound_spinning()


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
