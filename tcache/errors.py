"""The exceptions users see: a one-line TcacheError naming the problem and the fix, and Interrupted."""

from __future__ import annotations

import signal


class TcacheError(Exception):
    """A user-facing error. The CLI prints `Error: <message>` and exits non-zero, without a traceback.
    `resumable` is set when the command left state that the same command with --resume continues."""

    resumable: bool = False


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped a command. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` swallows it; the CLI exits with 128 + the signal number (130, 143)."""

    resumable: bool = False

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signum, self.detail = signum, detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name
