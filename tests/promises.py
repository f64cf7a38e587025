"""The shape of a reliability promise (tests/test_reliability.py): a command, the fault it meets, the exit code
and the one line it must end with, and the user's files, which must all survive byte for byte."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from click.testing import CliRunner


@dataclass
class Case:
    """What a fault's setup works with: a fresh directory, the suite's fixtures, and the user's files it makes."""

    tmp: Path
    fixtures: dict
    """Name -> path of a session fixture (tiny_teacher, teacher_dir, valid_jsonl, shared_cache, student, ...)."""
    owned: dict[Path, bytes] = field(default_factory=dict)
    """Every file the user owned before the command, with its bytes."""
    env: dict[str, str] = field(default_factory=dict)

    def user(self, rel: str, data: str | bytes = "the user's own bytes\n") -> Path:
        """Write a file the user owns (the check after the command wants it unchanged)."""
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        self.owned[p] = p.read_bytes()
        return p

    def check_owned(self) -> None:
        """Every file the user owned before is still there, byte for byte."""
        for path, data in self.owned.items():
            assert path.is_file() and path.read_bytes() == data, f"the user's {path} was changed or deleted"

    def own_all(self, root: Path) -> None:
        """Count every file already under `root` as the user's (a folder they made by other means)."""
        for p in root.rglob("*"):
            if p.is_file():
                self.owned[p] = p.read_bytes()


@dataclass
class Promise:
    """One row of the list of promises."""

    id: str
    """Short name; the issue's case number first where there is one (`21.1-build-overwrite-project-folder`)."""
    fault: Callable[[Case], list[str]]
    """Prepares the fault under case.tmp and returns the command's arguments after `tcache` (str each)."""
    code: int
    """Expected exit status (0: the command must succeed despite the fault, e.g. a refused value capped)."""
    message: str
    """A regular expression the command's one `Error:` line must match (re.search); for code 0, a line of its output."""
    subprocess: bool = False
    """Run `python -m tcache.cli.main` in a child process (signals, locks, environment) instead of click's runner."""
    after: Callable[[Case], None] | None = None
    """Extra checks once the command ended (what tcache itself must have left)."""
    needs_root: bool = False
    """Faults that need root (tmpfs, read-only bind mounts): skipped otherwise."""
    timeout: float = 120.0


@dataclass
class Outcome:
    code: int
    output: str


def invoke(args: list[str], case: Case, in_child: bool, timeout: float) -> Outcome:
    if in_child:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **case.env}
        p = subprocess.run([sys.executable, "-m", "tcache", *args], capture_output=True, text=True, env=env,
                           timeout=timeout, cwd=case.tmp)
        return Outcome(p.returncode, p.stdout + p.stderr)
    from tcache.cli.main import main

    old = dict(os.environ)
    os.environ.update(case.env)
    try:
        r = CliRunner().invoke(main, args)
    finally:
        os.environ.clear()
        os.environ.update(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        return Outcome(99, r.output + "Traceback:\n" + "".join(traceback.format_exception(r.exception)))
    return Outcome(r.exit_code, r.output)


STREAM_WAIT = 30.0  # seconds to wait for the streamed text before sending the signal
STOP_WITHIN = 5.0  # seconds a stopped command may take to exit (generate stops at the next token)


@dataclass
class Interrupt(Promise):
    """A promise whose command is stopped by a signal: run in a child process (subprocess is implied), `signum`
    sent as soon as its stdout so far matches `when` (re.search). `message` must match its one `Stopped by` line
    (stderr); `stdout` must match (re.fullmatch, DOTALL) what it printed, which must start with what it had
    printed when the signal came."""

    signum: int = signal.SIGINT
    when: str | Callable[[Case], str] = ""
    """A regex, or a function of the case giving one (a regex naming a prompt the case builds)."""
    stdout: str | Callable[[Case], str] = ".*"


def _drain(stream, sink: list[bytes]) -> None:
    for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
        sink.append(chunk)


def regex(value: str | Callable[[Case], str], case: Case) -> str:
    return value(case) if callable(value) else value


def interrupt(args: list[str], case: Case, row: Interrupt) -> tuple[Outcome, str, str, float]:
    """Run `python -m tcache ARGS`, send row.signum once stdout matches row.when: (outcome with stdout + stderr,
    stdout at the signal, final stdout, seconds from the signal to the exit)."""
    when = regex(row.when, case)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **case.env}
    proc = subprocess.Popen([sys.executable, "-m", "tcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=case.tmp)
    out, err = [], []
    readers = [threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
               threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True)]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + STREAM_WAIT
        while not re.search(when, b"".join(out).decode(errors="replace"), re.DOTALL):
            if proc.poll() is not None:
                pytest.fail(f"generate ended (exit {proc.returncode}) before its stdout showed {when[-80:]!r}: "
                            f"{b''.join(out)[-300:]!r} {b''.join(err)[-2000:]!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"nothing streamed within {STREAM_WAIT:.0f} s (stdout so far: {b''.join(out)[-300:]!r})")
            time.sleep(0.01)
        at_signal = b"".join(out).decode(errors="replace")
        proc.send_signal(row.signum)
        sent = time.monotonic()
        try:
            proc.wait(timeout=STOP_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_WITHIN:.0f} s after {signal.Signals(row.signum).name}")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in readers:
            t.join(timeout=10)
    stdout, stderr = b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")
    return Outcome(proc.returncode, stdout + stderr), at_signal, stdout, took
