"""The one exception type users see: its message is a single line naming the problem and the fix."""


class TcacheError(Exception):
    """A user-facing error. The CLI prints `Error: <message>` and exits non-zero, without a traceback."""
