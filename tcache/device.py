"""Device and dtype resolution: one rule for the teacher (--dtype) and the student (--precision)."""

from __future__ import annotations

import torch

from tcache.errors import TcacheError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *DTYPES)
"""What --dtype (build, eval) and --precision (distill) accept."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TcacheError(f"--device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TcacheError("--device cuda asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """'auto' is bf16 on a GPU that has it, fp16 on one that does not (T4), fp32 on CPU.
    `flag` names the option in errors (build's --dtype, distill's --precision)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise TcacheError(f"{flag} {dtype!r} is unknown; use one of auto, {', '.join(DTYPES)}")
    if DTYPES[dtype] is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TcacheError(f"{flag} bf16 is not supported by this GPU (e.g. a T4); use {flag} fp16")
    return DTYPES[dtype]
