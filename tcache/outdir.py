"""Output directories: what tcache may replace, where a replacement is built, and the atomic swap.

A user's data is never deleted: `--overwrite` replaces a directory only when tcache's marker proves it is
tcache's output (tcache.ownership), and removes only the entries the marker lists; anything else is refused by
name. A replacement is built beside the old output, in `.NAME.tcache-new`, and swapped in only when complete,
so an interrupted or failed `--overwrite` leaves the old output intact.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

from tcache import ownership
from tcache.errors import TcacheError

MANIFEST = ownership.MANIFEST
BUILD_STATE = ownership.BUILD_STATE
STUDENT = ownership.STUDENT
STAGING_SUFFIX = ".tcache-new"
_NAMES = {"cache": "a cache", "run": "a distill run", "export": "an export"}


def kind(path: Path) -> str:
    """missing, file, empty, cache (manifest.json), build (an interrupted build: no manifest), run, export (a HF
    model directory from `tcache export`), or other (anything tcache's marker does not prove to be its own)."""
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    names = {p.name for p in path.iterdir()} - {ownership.MARKER + ownership.PARTIAL}  # a claim cut short
    if not names:
        return "empty"
    k, _ = ownership.owner(path)
    if k == "cache":
        return "cache" if MANIFEST in names else "build"
    return k or "other"


def describe(k: str) -> str:
    """A kind as a message names it: "a tcache cache", "an interrupted build", "a folder tcache did not write"."""
    return {"cache": "a tcache cache", "build": "an interrupted tcache build", "run": "a tcache distill run",
            "export": "a tcache export"}.get(k, "a folder tcache did not write")


def staging(path: Path) -> Path:
    """Where a replacement of `path` is built: a hidden sibling on the same filesystem (rename is atomic)."""
    return path.parent / f".{path.name}{STAGING_SUFFIX}"


def retired(path: Path) -> Path:
    """Where swap_in moves the old output without renameat2's exchange, removed once the new one is in place."""
    return path.parent / f".{path.name}.tcache-old"


def refuse_foreign(path: Path, flag: str = "--out") -> None:
    """Refuse a directory holding anything tcache's marker does not list, naming the first entries."""
    names = ownership.foreign(path)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise TcacheError(f"{flag} {path} holds files tcache did not write ({shown}); "
                          f"move them away or choose another {flag}")


def classify(out: Path, what: str, flag: str = "--out") -> str:
    """kind(out) for a command that writes an output of kind `what` (cache, run or export), refusing a file,
    another kind of output, and a directory holding anything tcache did not write (never suggesting --overwrite
    for it: nothing there is tcache's to replace)."""
    k = kind(out)
    if k == "file":
        raise TcacheError(f"{flag} {out} is a file; pass a directory path")
    if k in ("missing", "empty"):
        return k
    refuse_foreign(out, flag)
    mine = ("cache", "build") if what == "cache" else (what,)
    if k not in mine:
        raise TcacheError(f"{flag} {out} is {describe(k)}, not {_NAMES[what]}; choose another {flag}")
    return k


def fresh_staging(out: Path, what: str) -> Path:
    """The staging sibling of `out`, emptied of what an earlier replacement left there. The sibling swap_in
    moves the old output to without renameat2 is checked too: a file the user put into an old output stays
    there when tcache's entries are removed, and refused only by swap_in it would end this --overwrite once its
    replacement is built."""
    stage = staging(out)
    for side in (stage, retired(out)):
        k = kind(side)
        if k == "file":
            raise TcacheError(f"{side} is a file in the way of --overwrite; remove it")
        if k not in ("missing", "empty"):
            classify(side, what, flag="staging directory")
    remove_ours(stage)
    return stage


def remove_ours(path: Path) -> None:
    """Delete the entries tcache's marker lists (an unmarked tcache 0.1.0 output: the names it wrote), the marker
    last, then the directory if empty. The manifest / student file goes first, so a removal cut short never
    leaves a valid-looking output, and the marker stays until the rest is gone, so it can be redone."""
    if not path.is_dir():
        return
    k, doc = ownership.owner(path)
    if k is None:
        if ownership.foreign(path):
            raise TcacheError(f"{path} is not tcache's output; nothing there was removed")
        (path / (ownership.MARKER + ownership.PARTIAL)).unlink(missing_ok=True)
        path.rmdir()
        return
    for first in (MANIFEST, STUDENT, BUILD_STATE):
        if ownership.listed(first, k, doc):
            (path / first).unlink(missing_ok=True)
    for p in path.iterdir():
        if p.name != ownership.MARKER and ownership.listed(p.name, k, doc):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (path / ownership.MARKER).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:  # something tcache did not write appeared meanwhile: left in place
        pass


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(new: Path, out: Path) -> None:
    """Make the complete output `new` live at `out`, then delete the old one. With renameat2 the swap
    is one atomic step; elsewhere two renames, with the old output kept until the new one is in place."""
    if not out.exists():
        os.replace(new, out)
        return
    if _exchange(new, out):
        remove_ours(new)  # `new` now holds the old output
        return
    old = retired(out)
    remove_ours(old)
    os.replace(out, old)
    os.replace(new, out)
    remove_ours(old)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a power loss after it keeps the new name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `path`."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_writable(out: Path, flag: str = "--out") -> None:
    """Refuse an output that cannot be written before any model loads or data is read: the nearest existing
    directory at or above `out` must accept a new file (probed with an unnamed temporary file, which leaves
    nothing behind; permission bits alone miss read-only mounts and /proc)."""
    import tempfile

    p = Path(os.path.abspath(os.path.expanduser(out)))
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise TcacheError(f"{flag} {out}: {p} is a file, not a directory; choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise TcacheError(f"{flag} {out} is not writable ({p}: {e.strerror}); choose a directory you can write to") from None


def _umask() -> int:
    """The process umask, read without changing it (os.umask would set it, briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def share_like_open(*paths: Path) -> None:
    """Give files the mode a plain open() gives (0666 minus the umask): safetensors writes 0600, which left a
    shared cache's weights unreadable to the people it is shared with. Directories are walked."""
    mode = 0o666 & ~_umask()
    for root in paths:
        for f in ([root] if root.is_file() else [q for q in root.rglob("*") if q.is_file()]):
            os.chmod(f, mode)

