"""A write that failed for want of space or permission, said in one line. The OS says why in an errno; safetensors
and h5py say it only in their message ("I/O error: No space left on device (os error 28)"), so both are read."""

from __future__ import annotations

import errno

from tcache.errors import TcacheError

FAULTS = (  # errno, how libraries spell it, what the user is told, the fix
    (errno.ENOSPC, ("No space left", "os error 28"), "the disk is full", "free space"),
    (errno.EDQUOT, ("Disk quota exceeded", "os error 122"), "the disk quota is exceeded", "free space"),
    (errno.EROFS, ("Read-only file system", "os error 30"), "the file system is read-only",
     "choose a writable place"),
    (errno.EACCES, ("Permission denied", "os error 13"), "permission is denied", "make it writable"),
)


def write_fault(e: BaseException) -> tuple[str, str] | None:
    """(what happened, the fix) when `e` is a failed write of one of FAULTS' kinds, else None."""
    for code, spellings, what, fix in FAULTS:
        if isinstance(e, OSError) and e.errno == code:
            return what, fix
    text = str(e) if isinstance(e, Exception) else ""
    for code, spellings, what, fix in FAULTS:
        if any(s in text for s in spellings):
            return what, fix
    return None


def is_disk_full(e: BaseException) -> bool:
    """A full disk or an exhausted quota, however the library reported it."""
    fault = write_fault(e)
    return fault is not None and fault[1] == "free space"


def write_error(path, e: BaseException, then: str = "rerun") -> TcacheError | None:
    """TcacheError("PATH: the disk is full; free space, then rerun") for a failed write, None for anything else
    (the caller re-raises it: a bug is not a disk fault)."""
    fault = write_fault(e)
    if fault is None:
        return None
    return TcacheError(f"{path}: {fault[0]}; {fault[1]}, then {then}")
