"""The `tcache` executable: a signal while Python is still importing torch and transformers (seconds) ends the
process with one line and the usual exit code (130 / 143) instead of an import traceback; then the command runs
with the ordinary handlers, which each command replaces with its own where it stops cleanly."""

from __future__ import annotations

import os
import signal
import sys


def _stopped_while_starting(signum, frame) -> None:
    sys.stderr.write(f"Stopped by {signal.Signals(signum).name} while tcache was starting; nothing was done.\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # nothing is written yet: no cleanup to run, and no import to unwind


def run() -> None:
    before = {s: signal.signal(s, _stopped_while_starting) for s in (signal.SIGINT, signal.SIGTERM)}
    from tcache.cli.main import main

    for s, handler in before.items():
        signal.signal(s, handler)
    main()
