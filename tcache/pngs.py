"""PNG outputs: signed as tcache's (a Software text chunk), replaced only where tcache drew the file, written
atomically beside their target and renamed over it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import tcache
from tcache.errors import TcacheError
from tcache.outdir import check_writable

SOFTWARE = f"tcache {tcache.__version__}"  # the PNG text chunk that proves a plot is tcache's to replace


def written_by_tcache(path: str | os.PathLike) -> bool:
    """Whether `path` is a PNG that tcache drew: its Software text chunk names tcache (SOFTWARE)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = getattr(im, "text", im.info)  # a PNG's text chunks; another format's info
            return str(text.get("Software", "")).startswith("tcache ")
    except (OSError, ValueError, SyntaxError):  # not an image, or a PNG PIL cannot parse
        return False


def check_target(out: str | os.PathLike, flag: str = "--out", ours: bool = False) -> None:
    """Refuse, before any work, a PNG target tcache may not write: a directory, an existing file it did not
    draw (a user's image is never replaced; `ours`: a run's training.png, only ever tcache's), or a location
    that cannot take a new file."""
    out = Path(out)
    if out.is_dir():
        raise TcacheError(f"{flag} {out} is a directory; pass a file name such as {out / 'plot.png'}")
    if out.exists() and not ours and not written_by_tcache(out):
        raise _not_ours(out, flag)
    # the PNG is written beside its target, then renamed over it: the directory must take a new file
    check_writable(out.parent if out.exists() else out, flag)


def _not_ours(out: Path, flag: str) -> TcacheError:
    return TcacheError(f"{flag} {out} exists and was not written by tcache; choose another {flag} or move it away")


def save(fig, canvas_cls, out: str | os.PathLike, flag: str | None = None) -> Path:
    """Write the figure at `out` atomically, signed as tcache's. With `flag` (a target the user named), a file
    that appeared there while drawing is checked again, so only a plot of tcache's is ever replaced."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        canvas_cls(fig).print_figure(tmp, format="png", dpi=fig.dpi, metadata={"Software": SOFTWARE})
        if flag is not None and out.exists() and not written_by_tcache(out):
            tmp.unlink()
            raise _not_ours(out, flag)
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):  # a read-only directory refuses the unlink too
            tmp.unlink(missing_ok=True)
        raise TcacheError(f"cannot write the plot {out} ({e.strerror or e}); pass a writable path") from None
    return out
