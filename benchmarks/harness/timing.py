"""Wall time of device work: clocks that wait for the GPU (or read CUDA events), step loops, peak memory."""

from __future__ import annotations

import gc
import time
from typing import Callable

import torch

from harness.env import device_name


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    """Wait for the GPU's queued work, so a host clock read after it covers that work (nothing on the CPU)."""
    if cuda():
        torch.cuda.synchronize()


def reset_peak() -> None:
    """Start a new peak: the allocator's high-water mark, and its cached blocks returned (a clean peak per row)."""
    if cuda():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def peak_gib() -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, GiB to 3 decimals; None on the CPU."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda() else None


def loop_seconds(one: Callable[[int], object], warmup: int, steps: int) -> tuple[float, float]:
    """(warm-up seconds, timed seconds): one(i) for i < warmup, then one(i) for i < steps, each phase ended by a
    synchronize so its clock covers the GPU work it queued."""
    out = []
    for n in (warmup, steps):
        t0 = time.perf_counter()
        for i in range(n):
            one(i)
        sync()
        out.append(time.perf_counter() - t0)
    return out[0], out[1]


def cuda_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Milliseconds of GPU time per call of fn, by CUDA events around `reps` calls after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


class Dev:
    """Where tensors live and how time and memory are read there. On a GPU: CUDA events (they time the device's
    work without making the host wait), synchronize, the caching allocator's peak. On CPU, which runs synchronously:
    the wall clock, and no peak. `cuda` can be set apart from `device` to dry-run the GPU branches on CPU."""

    def __init__(self, device: torch.device, cuda: bool | None = None):
        self.device = device
        self.cuda = device.type == "cuda" if cuda is None else cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def stamp(self):
        """A point in time; `ms(a, b)` reads the interval once the work before b is done (after sync())."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def free(self) -> None:
        """Return what the last cell left (an OOM's traceback frames included) before the next one."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def name(self) -> str:
        return device_name(self.device)

    def copy_gbps(self) -> float:
        """The device's copy bandwidth: bytes read + written per second by a large device-to-device copy, the
        ceiling a memory-bound step is measured against (KINDS.md saw ~4.3 TB/s on an H200)."""
        n, reps = (2**30, 10) if self.cuda else (2**26, 5)
        src = torch.empty(n, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch, outside the timing
        self.sync()
        t0 = self.stamp()
        for _ in range(reps):
            dst.copy_(src)
        t1 = self.stamp()
        self.sync()
        return 2 * n * reps / (self.ms(t0, t1) / 1e3) / 1e9
