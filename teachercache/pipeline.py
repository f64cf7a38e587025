"""Threads that keep the GPU busy during a build: tokenisation ahead of it, HDF5 writes behind it.

Hand-written rather than a DataLoader because the producer is one ordered stream (packing is
sequential) and the consumer must write in order; two bounded queues express exactly that. The
tokenizer (Rust) and CUDA release the GIL, so the threads overlap for real.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

_DONE = object()


class Prefetcher:
    """Iterates `source` in a background thread, `depth` items ahead; re-raises its errors in the caller."""

    def __init__(self, source: Iterable, depth: int = 4):
        self.wait_s = 0.0  # time the consumer waited for items: > 0 means the source is the bottleneck
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(source),), daemon=True)
        self._thread.start()

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            self._q.put(e)

    def __iter__(self):
        while True:
            t = time.perf_counter()
            item = self._q.get()
            self.wait_s += time.perf_counter() - t
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()


def batched_rows(rows: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Stack rows (T,) into batches (B, T); the last batch may be shorter."""
    it = iter(rows)
    while batch := list(itertools.islice(it, batch_size)):
        yield np.stack(batch)


class AsyncWriter:
    """Consumes {field: tensor} batches in a background thread, in order.

    On CUDA the device-to-host copies go into pinned buffers with non_blocking=True and the writer
    thread waits on a CUDA event before reading them, so the next forward starts at once."""

    def __init__(self, write: Callable[[dict[str, np.ndarray]], None], depth: int = 2):
        self._write = write
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.busy_s = 0.0  # time spent writing: how much of the build the writer could hide
        self.put_wait_s = 0.0  # time the producer waited for a free slot: > 0 means the writer is the bottleneck
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if self._error is not None:
                continue  # drain after a failure
            tensors, event = item
            try:
                if event is not None:
                    event.synchronize()
                t = time.perf_counter()
                self._write({k: v.numpy() for k, v in tensors.items()})
                self.busy_s += time.perf_counter() - t
            except BaseException as e:
                self._error = e

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._error is not None:
            raise self._error
        on_cuda = any(t.is_cuda for t in tensors.values())
        if on_cuda:
            # Copies on a side stream, after the compute that made the tensors, overlap the next forward.
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                        for k, v in tensors.items()}
                event = torch.cuda.Event()
                event.record(self._stream)
            for v in tensors.values():
                v.record_stream(self._stream)  # the allocator keeps them until the copy is done
        else:
            host, event = tensors, None
        t = time.perf_counter()
        self._q.put((host, event))
        self.put_wait_s += time.perf_counter() - t

    def close(self, raise_error: bool = True) -> None:
        """Wait for every queued batch to be written; raise the first write error."""
        if self._thread.is_alive():
            self._q.put(_DONE)
            self._thread.join()
        if raise_error and self._error is not None:
            raise self._error
