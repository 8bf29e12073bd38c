"""Device and dtype names from recipes and flags -> torch objects, with one-line errors."""

from __future__ import annotations

import torch

from smpo_cli.errors import UsageError
from smpo_cli.utils.logging import get_logger, warning_once

logger = get_logger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → cuda if available, else mps, else cpu; otherwise ``cpu``, ``cuda[:N]``, ``mps``."""
    if isinstance(spec, torch.device):
        device = spec
    else:
        text = str(spec).strip().lower()
        if text in ("", "auto"):
            if torch.cuda.is_available():
                return torch.device("cuda")
            mps = getattr(torch.backends, "mps", None)
            if mps is not None and mps.is_available():
                return torch.device("mps")
            return torch.device("cpu")
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise UsageError(f"unknown device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {spec!r} asked but CUDA is not available here", hint="use device=auto or cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(
            f"device {spec!r} asked but only {torch.cuda.device_count()} CUDA device(s) are visible",
            hint="check CUDA_VISIBLE_DEVICES",
        )
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"device {spec!r} asked but MPS is not available here", hint="use device=auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {spec!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(spec: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` → float16 on CUDA, float32 elsewhere; accepts float32|fp32|float16|fp16|bfloat16|bf16."""
    if isinstance(spec, torch.dtype):
        dtype = spec
    else:
        text = str(spec).strip().lower().removeprefix("torch.")
        if text in ("", "auto"):
            return torch.float16 if torch.device(device).type == "cuda" else torch.float32
        if text not in _DTYPES:
            raise UsageError(
                f"unknown dtype {spec!r}", hint="use auto, float32 (fp32), float16 (fp16) or bfloat16 (bf16)"
            )
        dtype = _DTYPES[text]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UsageError(f"unsupported dtype {spec!r}", hint="use float32, float16 or bfloat16")
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        warning_once(logger, "float16 on CPU is slow and some ops are missing; float32 or bfloat16 is safer")
    return dtype
