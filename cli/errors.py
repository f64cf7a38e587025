"""The one place that turns library errors into CLI errors: `Error: <one line>`, exit 1, no traceback."""

from __future__ import annotations

import functools

import click

from tcache.errors import TcacheError

WRAPPED_MARKER = "Original Traceback"
ERROR_PREFIX = "TcacheError: "


def one_line(message: str) -> str:
    """The user's line of a TcacheError message. A DataLoader worker's error comes back to the main process
    re-raised as TcacheError("Caught TcacheError in DataLoader worker process 0.\nOriginal Traceback ...
    teachercache.errors.TcacheError: <message>"): only <message> is meant for the user."""
    if WRAPPED_MARKER in message and ERROR_PREFIX in message:
        return message.rsplit(ERROR_PREFIX, 1)[1].strip()
    return message


def friendly_errors(fn):
    """TcacheError -> `Error: <one line>` and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TcacheError as e:
            raise click.ClickException(one_line(str(e))) from None

    return wrapper
