"""One command per output: an exclusive lock (fcntl.flock) on `.NAME.tcache-lock` beside the output, held for
the whole command, so two builds (or distills, exports, plots) into one --out cannot both report success.

flock dies with its holder: a lock left by a killed process never blocks. The lock file names its holder (pid
and command line) for the refusal, and is removed on release; a process that opened it just before that removal
finds its inode unlinked and opens the new file (the usual flock + unlink protocol).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

from tcache.errors import TcacheError

SUFFIX = ".tcache-lock"


def lock_path(out: Path) -> Path:
    """The lock beside `out` (not inside: the output's own entries are only what tcache wrote). Under torchrun each
    rank locks its own file, so the ranks of one command do not refuse each other but two commands do."""
    from tcache import dist

    rank = f"-rank-{dist.rank()}" if dist.world() > 1 and dist.rank() else ""
    return out.parent / f".{out.name}{SUFFIX}{rank}"


@contextlib.contextmanager
def locked(out: str | os.PathLike, flag: str = "--out") -> Iterator[None]:
    """Hold the lock of output `out` for the block; refuse at once, in one line, when another process holds it."""
    out = Path(os.path.abspath(os.path.expanduser(out)))
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TcacheError(f"{flag} {out}: cannot create {path.parent} ({e.strerror}); choose another {flag}") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise TcacheError(f"{flag} {out} is not writable (its lock {path}: {e.strerror}); "
                              "choose a directory you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise TcacheError(f"{flag} {out} is in use by {holder}; wait for it to finish or choose another {flag}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file between our open and flock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(['tcache', *sys.argv[1:]])[:300]})".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
