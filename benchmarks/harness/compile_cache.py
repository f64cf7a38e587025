"""torch.compile's caches carried between GPU machines: a part's compiled artifacts saved after it ran, loaded
before it runs on the next machine.

A GPU session here starts a fresh machine, and compiling the hybrid's stage II step there took 381 s of a
30-minute device budget (H100, two parts at a time). torch.compile's own portable cache
(`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`: inductor's graphs with their Triton kernels,
AOTAutograd's entries, autotuning) is what it offers for this; its entries are keyed by torch, Triton and the GPU,
so a file is kept per GPU name and a file from another GPU or version only misses, never misleads.

    TCACHE_BENCH_COMPILE_CACHE=DIR   a part loads DIR/<gpu>/<part>.bin when there, and writes it after running
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV = "TCACHE_BENCH_COMPILE_CACHE"


def gpu_slug() -> str | None:
    """This GPU's name as a folder name; None without a GPU (a CPU run carries nothing)."""
    import torch

    return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-") if torch.cuda.is_available() else None


def artifact_path(part: str) -> Path | None:
    """DIR/<gpu name>/<part>.bin under $TCACHE_BENCH_COMPILE_CACHE; None when it is unset or there is no GPU."""
    root, gpu = os.environ.get(ENV), gpu_slug()
    return Path(root) / gpu / f"{part}.bin" if root and gpu else None


def load(part: str) -> bool:
    """Load the part's carried artifacts into this process's caches; True when there were some."""
    import torch

    path = artifact_path(part)
    if path is None or not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True


def save(part: str) -> int:
    """Write what this process compiled (with what it loaded) for the next machine; the bytes written, 0 if none.
    Written to a temporary name and renamed, so a run cut by its time limit leaves the old file."""
    import torch

    path = artifact_path(part)
    saved = torch.compiler.save_cache_artifacts() if path is not None else None
    if not saved:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(saved[0])
    os.replace(tmp, path)
    return len(saved[0])
