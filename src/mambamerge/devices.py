"""Device names and mixed precision, checked before any work is done."""
import contextlib

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


def autocast(device: torch.device, amp: str):
    """A torch.autocast context for `amp` ("bf16" / "fp16"), or a no-op for "none"."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])
