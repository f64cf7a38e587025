"""Is the hybrid's forward linear in T on the CPU? Forward seconds of the shared teacher converted to the default
hybrid (window 32 + 4 sinks + mLSTM, fp32, batch 1, no grad) at each length, the best of --repeats, and each length's
time over the first's (issue 23's target: 4096 tokens at most 6x 1024).

    python benchmarks/cpu_window.py --teacher ../shared/teacher --lengths 1024,2048,4096 --out FILE.json

Run it from two checkouts (before and after a change) to compare; the JSON names the commit it ran.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch

from harness.env import versions
from harness.results import write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="../shared/teacher")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    from tcache.student.models.hybrid import HybridConfig, load_hybrid

    torch.set_num_threads(a.threads)
    model = load_hybrid(a.teacher, HybridConfig()).eval()
    model.set_kernel(torch.device("cpu"))
    rows = {}
    for T in map(int, a.lengths.split(",")):
        ids = torch.randint(1, model.lm.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
        best = float("inf")
        with torch.no_grad():
            model(ids)  # warm-up
            for _ in range(a.repeats):
                t = time.perf_counter()
                model(ids)
                best = min(best, time.perf_counter() - t)
        rows[T] = best
        print(f"T {T:6d}: {best:.3f} s  ({best / rows[min(rows)]:.2f}x the first length)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"commit": commit, "threads": a.threads, **versions(), "seconds": rows,
              "ratio_last_to_first": rows[max(rows)] / rows[min(rows)]}
    if a.out:
        write_json(Path(a.out), result)


if __name__ == "__main__":
    main()
