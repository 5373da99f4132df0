"""Bytes a forward or a training step needs, bytes the machine has free, and the one check every command
makes before it writes anything: a size argument beyond what fits is refused with the figures.
The constants are measured peaks (docs/security.md, "Sizes the machine cannot hold"), rounded up so that
the estimate errs towards refusing only what clearly cannot fit."""
import math
import resource
from pathlib import Path
from typing import Callable

INFER_BYTES = 96  # per token per inner channel in one forward (measured 43-89)
TRAIN_BYTES = 64  # per block per token per inner channel kept for backward (measured 13.5-16 floats)
LOG_DEPTH_FACTOR = {False: 10, True: 40}  # the parallel scan holds (batch, d_inner, L, d_state)
MAX_SIDE = 4096  # pixels: 65536 patches of 16; beyond it even building the model is absurd


def step_bytes(model, batch: int, training: bool = False, scan: str = "compiled") -> int:
    """Estimated peak bytes of one forward (training: forward + backward + AdamW state) of `model` on a
    batch of `batch` inputs; scan is the scan path (ops.mixer_backend), "parallel" costing more."""
    cfg = model.cfg
    tokens, d_inner = model.layout.length, cfg.expand * cfg.embed_dim
    per_token = TRAIN_BYTES * cfg.depth if training else INFER_BYTES
    if scan == "parallel":
        per_token *= LOG_DEPTH_FACTOR[training]
    params = sum(p.numel() for p in model.parameters()) * 4 * (4 if training else 1)
    inputs = math.prod(model.input_shape) * 4 * batch
    return batch * tokens * d_inner * per_token + params + 2 * inputs


def _meminfo_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return math.inf


def _address_space_left() -> float:
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return math.inf
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return limit - int(line.split()[1]) * 1024
    return limit


def _cgroup_left() -> float:
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text != "max":
                return int(text) - int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
    return math.inf


def available_bytes(device="cpu") -> float:
    """Free memory on device: on CUDA the driver's free figure, on the CPU the least of /proc/meminfo's
    MemAvailable, the address space left under RLIMIT_AS and the cgroup's limit less its usage."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return min(_meminfo_available(), _address_space_left(), _cgroup_left())


def check_fits(name: str, value: int, need: Callable[[int], float], device="cpu") -> None:
    """Raise ValueError naming the estimate, the free memory and the largest value of argument `name`
    that fits, when need(value) bytes (need grows with value) exceed what device has free."""
    free = available_bytes(device)
    if need(value) <= free:
        return
    low, high = 0, value  # need(low) fits (or low == 0), need(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if need(mid) <= free else (low, mid)
    fits = f"the largest that fits is {name} {low}" if low else f"no {name} fits"
    raise ValueError(f"{name} {value} needs about {need(value) / 2**30:.1f} GiB but {device} has "
                     f"{free / 2**30:.1f} GiB free; {fits}")


def check_side(name: str, side) -> None:
    """Refuse an image side beyond MAX_SIDE before a model or an input of that size is built."""
    if side is not None and side > MAX_SIDE:
        raise ValueError(f"{name} {side} is beyond {MAX_SIDE} pixels; pick a size the model can hold")


SIZE_ARGS = ("batch_size", "throughput_batch", "images")  # the batch-like arguments of the commands


def check_size_args(args, model, device="cpu", training: bool = False) -> None:
    """Refuse each batch-like argument of a command (--batch-size, --throughput-batch, --images) whose
    forward on `model` (or training step) would not fit on device; called before any output is written."""
    from mambamerge.ops import mixer_backend

    scan = mixer_backend(device)
    for attr in SIZE_ARGS:
        value = getattr(args, attr, None)
        if isinstance(value, int) and value > 0:
            check_fits("--" + attr.replace("_", "-"), value, lambda n: step_bytes(model, n, training, scan), device)
