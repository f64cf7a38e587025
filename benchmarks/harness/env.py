"""What a result was measured on and how: the device, the library versions, the exact command line."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: its tcache is the one the benchmarks and their child processes import (harness/__init__.py puts it
on sys.path)."""


def command() -> str:
    """The command line that ran this process, quoted so it can be pasted back into a shell."""
    return "python " + shlex.join(sys.argv)


def device_name(device=None) -> str:
    """The GPU's name when `device` is a CUDA device (or, with no device, when CUDA is available); else the CPU's."""
    import torch

    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"


def versions() -> dict:
    """torch, transformers (None where it is not installed) and python, as this process imports them."""
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # the CPU-only scripts do not need it
        tf = None
    return {"torch": torch.__version__, "transformers": tf, "python": platform.python_version()}


def describe(device=None) -> dict:
    """device, torch, transformers, python, command: the head of every results JSON."""
    return {"device": device_name(device), **versions(), "command": command()}


def tcache(*args) -> list[str]:
    """A `tcache` command as a child process runs it: this interpreter, this checkout's package."""
    return [sys.executable, "-m", "tcache", *map(str, args)]


def child_env(**extra: str) -> dict:
    """The environment of a row's process: this one, this checkout first on PYTHONPATH, output unbuffered (the
    parent's log shows a row's lines as they come), plus `extra`."""
    path = f"{ROOT}:{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else str(ROOT)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def workdirs(a) -> tuple[Path, Path]:
    """(a.work, a.out) as directories, created when missing."""
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return work, out


def parser(doc: str | None, required: tuple[str, ...] = (), work: str | None = None):
    """An argument parser whose --help is the script's docstring, with the usual flags: each of `required` (e.g.
    "teacher", "train", "out") a required path, and --work defaulting to `work` (scratch: caches, runs) when given."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in required:
        ap.add_argument(f"--{name}", required=True)
    if work is not None:
        ap.add_argument("--work", default=work, help="scratch directory (caches, runs)")
    return ap
