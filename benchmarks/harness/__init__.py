"""The benchmarks' shared harness: what every script under benchmarks/ measures with, written once.

    env      the device, the library versions and the exact command line a result was measured with
    timing   wall time of device work (CUDA-synchronised clocks and events) and peak memory
    decode_timing  decode tokens/s from two whole generate() calls, generate(1 + N) - generate(1); kernels per step
             from a separately profiled pair
    results  the results JSON (written whole), markdown tables, and a row process's one-line RESULT handoff
    rows     a row in a process of its own, inside a time budget; a failed row is recorded, not fatal

Scripts run as `python benchmarks/X.py`, which puts benchmarks/ on sys.path: they import `harness.env` etc. as
top-level modules, as the tests (which add benchmarks/ to sys.path) do.
"""

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # this checkout's tcache, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
