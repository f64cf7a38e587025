"""SIGINT / SIGTERM as exceptions: what `timeout`, docker, Slurm and Ctrl-C send ends a command cleanly.

Python's default SIGTERM kills the process on the spot (no cleanup, no message); its SIGINT raises
KeyboardInterrupt. Inside `stop_on_signals`, both raise Interrupted in the main thread instead, or, with
`graceful=True`, the first one only sets `requested` (a training loop finishes its step and checkpoints)
and a second one raises at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from tcache.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The first signal's number once one arrived (0 before)."""

    def __init__(self) -> None:
        self.signum = 0

    @property
    def requested(self) -> bool:
        return self.signum != 0


@contextlib.contextmanager
def stop_on_signals(graceful: bool = False):
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield stop
        return

    def handler(signum, frame):
        if graceful and not stop.requested:
            stop.signum = signum
            return
        stop.signum = stop.signum or signum
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
