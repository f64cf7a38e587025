"""Rows in processes of their own, inside a time budget. A row that would not fit is not started, one that runs past
its share is stopped with everything it started (its own process group), and a failed row is recorded, not fatal."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from harness.results import received

LIVE: set = set()
"""Row processes running now: stopping the parent stops them all."""
STOP = threading.Event()
"""Set when the parent is stopped: no row starts after it."""


@dataclass
class Row:
    """How a row's process ended."""

    rc: int | None  # None: not started, or stopped at its limit
    wall_s: float
    timed_out: bool = False
    stdout: str = ""  # with capture=True
    stderr: str = ""

    @property
    def status(self) -> str:
        if self.rc is None and not self.timed_out:
            return "not started"
        return "stopped at its time limit" if self.timed_out else "ok" if self.rc == 0 else f"exited {self.rc}"


class Budget:
    """Seconds for a whole run (0 or None: no limit), shared out as rows start."""

    def __init__(self, seconds: float | None, start: float | None = None):
        self.deadline = (start or time.monotonic()) + seconds if seconds else None

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def share(self, weight: float, weights_left: float) -> float | None:
        """A row's seconds: its weight's part of what is left, so time a row leaves unused goes to the later ones."""
        left = self.left()
        return None if left is None else left * weight / weights_left


def kill_group(p: subprocess.Popen) -> None:
    """Stop a row's process and what it started (compile workers, loader workers): its own process group."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def run_row(cmd: list[str], limit: float | None = None, env: dict | None = None, stdout=None, stderr=None,
            capture: bool = False, cwd=None) -> Row:
    """Run `cmd` in a process group of its own for at most `limit` seconds (None: no limit). Its output goes to
    `stdout` / `stderr` (open files; None: this process's), or with capture=True into the Row."""
    if STOP.is_set():
        raise KeyboardInterrupt
    t0 = time.monotonic()
    pipe = subprocess.PIPE if capture else None
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=pipe or stdout, stderr=pipe or stderr, text=capture,
                         process_group=0)
    LIVE.add(p)
    timed_out = False
    try:
        out, err = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        timed_out = True
    except BaseException:  # Ctrl-C or SIGTERM: the row's group does not get them, so it is stopped here
        kill_group(p)
        raise
    finally:
        LIVE.discard(p)
    return Row(None if timed_out else p.returncode, time.monotonic() - t0, timed_out, out or "", err or "")


def run_result(cmd: list[str], limit: float | None = None, env: dict | None = None) -> dict:
    """A row whose process hands its result back as a RESULT line (results.emit): that dict, or {"error": ...} with
    its last stderr line, or with the limit it ran past."""
    r = run_row(cmd, limit, env, capture=True)
    if r.timed_out:
        return {"error": f"not run: stopped at its limit ({limit:.0f} s)"}
    return received(r.stdout, r.stderr)


@contextlib.contextmanager
def stoppable():
    """While the parent runs rows: SIGTERM exits it as Ctrl-C does, and however it ends, no row's process group
    outlives it."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        STOP.set()
        for p in list(LIVE):
            kill_group(p)
