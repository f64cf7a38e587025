"""Two signals (tcache/signals.py): the first SIGINT / SIGTERM lets a build finish its batch (graceful), a second one
stops it at once, with the usual `Stopped by` line, exit code and resume command. Only a batch far longer than the
time allowed for that tells "at once" from "after the batch", so the child's teacher batch is made slow (a sleep,
which a signal handler that raises cuts short, as it does the teacher's real work between bytecodes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tcache
from conftest import text_head

BATCH_S = 120.0  # one teacher batch in the child: what the first signal alone waits for
WITHIN_S = 15.0  # the second signal must end the build in this (exiting takes ~1 s on 2 cores)

CHILD = """
import sys, time
from pathlib import Path

import tcache.teachercache.build as build_mod

real, started, seconds = build_mod.TeacherPass.__call__, Path(sys.argv[1]), float(sys.argv[2])


def slow_batch(self, *a, **k):
    started.touch()
    time.sleep(seconds)
    return real(self, *a, **k)


build_mod.TeacherPass.__call__ = slow_batch
sys.argv = ["tcache", *sys.argv[3:]]
from tcache.cli.entry import run

run()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_second_signal_stops_a_build_at_once(tmp_path, tiny_teacher, valid_jsonl, sig):
    text = text_head(valid_jsonl, tmp_path / "t.jsonl", 4000, docs=1)
    out, started = tmp_path / "cache", tmp_path / "batch-started"
    args = ["build", "--teacher", tiny_teacher, "--data", text, "--tokens", 4 * 32, "--seq-len", 32, "--top-k", 4,
            "--batch-size", 2, "--device", "cpu", "--out", out]
    env = {**os.environ, "PYTHONPATH": str(Path(tcache.__file__).parents[1])}  # this test's tcache
    proc = subprocess.Popen([sys.executable, "-c", CHILD, started, str(BATCH_S), *map(str, args)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not started.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 120, "the build did not reach its first batch"
            time.sleep(0.02)
        proc.send_signal(sig)
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()  # the first one waits for the batch
        proc.send_signal(sig)
        t1 = time.monotonic()
        try:
            _, err = proc.communicate(timeout=WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the second {sig.name} did not stop the build within {WITHIN_S:.0f} s (the batch takes "
                        f"{BATCH_S:.0f} s)")
        took = time.monotonic() - t1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert f"Stopped by {sig.name}." in err and "Traceback" not in err, err
    assert "Resume with: tcache build" in err and "--resume" in err, err
    assert not (out / "manifest.json").exists() and (out / ".tcache-output.json").exists()  # a build to resume
    print(f"stopped {took:.1f} s after the second {sig.name}")
