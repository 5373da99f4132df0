"""Device names and mixed precision, checked before any work is done; which bf16 arithmetic the CPU has."""
import contextlib
import warnings
from pathlib import Path
from typing import Optional

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("none", *AMP_DTYPES)


def parse_device(name: str) -> torch.device:
    """torch.device(name), or a ValueError saying why this machine cannot use it."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name ({err}); use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no usable CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def check_amp(amp: str, device: torch.device) -> None:
    """amp: "none", "bf16" (CPU or GPU) or "fp16" (GPU only: it needs loss scaling and CUDA kernels)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or none")
    if amp == "bf16" and device.type == "cpu" and cpu_bf16() == "none":
        warnings.warn("this CPU has no bf16 arithmetic (no AMX, AVX-512-BF16 or Arm BF16): bf16 autocast is "
                      "emulated and slower than float32; use --amp none", stacklevel=2)


def autocast(device: torch.device, amp: str):
    """A torch.autocast context for `amp` ("bf16" / "fp16"), or a no-op for "none"."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16(cpuinfo: Optional[str] = None) -> str:
    """The bf16 arithmetic of this CPU, from the flags of `cpuinfo` (the text of /proc/cpuinfo, read when
    None): "AMX" (amx_bf16 and amx_tile: tile matrix multiplies, the fastest), "AVX-512-BF16"
    (avx512_bf16: bf16 dot products in vector registers), "Arm BF16" (the bf16 feature of an Arm core),
    "none" (bf16 is converted to float32 and back around every operation: slower than float32), or
    "unknown" (no /proc/cpuinfo, not Linux, or no flags line in it)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return "unknown"
    flags = None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):  # x86, Arm; every core lists the same
            flags = set(value.split())
            break
    if flags is None:
        return "unknown"
    if {"amx_bf16", "amx_tile"} <= flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512-BF16"
    if "bf16" in flags:
        return "Arm BF16"
    return "none"


def describe_cpu_bf16() -> str:
    """One line for a command's header: the CPU's bf16 arithmetic (cpu_bf16) and, as a cross-check, the
    vector instructions torch's own CPU kernels were dispatched to (an AVX-512 CPU held to AVX2 by
    ATEN_CPU_CAPABILITY shows here)."""
    found = cpu_bf16()
    advice = {"none": ": --amp bf16 would be emulated, slower than float32",
              "unknown": " (no CPU flags in /proc/cpuinfo to read)"}.get(found, "")
    return f"bf16 arithmetic {found}{advice}; torch's CPU kernels: {torch.backends.cpu.get_cpu_capability()}"
