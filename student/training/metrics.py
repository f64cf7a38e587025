"""The metrics log: one JSON line per optimizer step in metrics.jsonl, written without making the CPU wait
for the GPU, and cut back to a checkpoint's step when a run resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Writes one metrics line per optimizer step, one step late: the step's values are copied to the
    host without blocking and read when the next step has been queued, so logging never makes the CPU
    wait for the GPU (measured: a float() per step held distill from disk at 0.83x of the in-GPU step)."""

    def __init__(self, f, on_record: Callable[[dict], None]):
        self.f, self.on_record = f, on_record
        self.pending: tuple[dict, list[str], torch.Tensor, object] | None = None

    def put(self, record: dict, values: dict) -> dict | None:
        """Queue this step's record; returns the previous step's completed record, if any (on CPU, this one's)."""
        done = self.flush()
        names = list(values)
        device = values["loss"].device
        stacked = torch.stack([torch.as_tensor(values[n], device=device).float().reshape(()) for n in names])  # (n,)
        if stacked.is_cuda:
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = stacked, None
        self.pending = (record, names, host, event)
        if event is None:  # CPU: the values are already here, so the step is shown as soon as it ends
            return self.flush()
        return done

    def flush(self) -> dict | None:
        if self.pending is None:
            return None
        record, names, host, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        record = {**record, **{n: float(v) for n, v in zip(names, host.tolist())}}
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        self.on_record(record)
        return record


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`; a torn last line (a kill during a write) is dropped."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
