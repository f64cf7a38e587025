"""Image outputs (plots): drawn in the format their name asks for (.png, .jpg, .pdf, .svg; any other name refused),
signed as tcache's in that format's text (a PNG's Software chunk, a JPEG comment, a PDF's or SVG's Creator),
replaced only where tcache drew the file, written atomically beside their target and renamed over it."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import tcache
from tcache.errors import TcacheError
from tcache.writefaults import is_disk_full, write_error
from tcache.outdir import check_writable

SOFTWARE = f"tcache {tcache.__version__}"  # the text in each image that proves a plot is tcache's to replace

# name suffix -> matplotlib's format: the formats whose files can carry SOFTWARE (so a later draw may replace them)
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}
SNIFF = 64 << 10  # bytes read from each end of a file to find its signature (a PDF's info dict is near its end)


def image_format(out: str | os.PathLike, flag: str = "--out") -> str:
    """The format `out`'s name asks for; refused in one line where it names none tcache writes (a plot written
    as PNG bytes under a .txt or .jpg name is a file no program opens as what it says)."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        what = f"{suffix} is not an image format tcache writes" if suffix else "has no extension to name its format"
        raise TcacheError(f"{flag} {out}: {what}; name it .png, .jpg, .pdf or .svg")
    return FORMATS[suffix]


def _signed(fmt: str) -> dict:
    """print_figure's arguments that write SOFTWARE into an image of this format (JPEG: a comment segment)."""
    if fmt == "jpeg":
        return {"pil_kwargs": {"comment": SOFTWARE.encode()}}
    return {"metadata": {"Software" if fmt == "png" else "Creator": SOFTWARE}}


def written_by_tcache(path: str | os.PathLike) -> bool:
    """Whether `path` is an image that tcache drew, whatever its name: its content's signature names tcache
    (SOFTWARE): a PNG's Software chunk, a JPEG's comment, a PDF's or SVG's Creator."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF)
            f.seek(max(f.seek(0, os.SEEK_END) - SNIFF, 0))
            tail = f.read()
    except OSError:
        return False
    if head.startswith(b"%PDF-"):
        return re.search(rb"/Creator \(tcache ", tail) is not None
    if b"<svg" in head:
        return re.search(rb"<dc:creator>\s*<cc:Agent>\s*<dc:title>tcache ", head) is not None
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = getattr(im, "text", None) if im.format == "PNG" else None  # PNG text chunks, even after the pixels
            sign = text.get("Software", "") if text is not None else im.info.get("comment", b"")
            sign = sign.decode(errors="replace") if isinstance(sign, bytes) else str(sign)
            return sign.startswith("tcache ")
    except (OSError, ValueError, SyntaxError):  # not an image, or one PIL cannot parse
        return False


def check_target(out: str | os.PathLike, flag: str = "--out", ours: bool = False) -> None:
    """Refuse, before any work, an image target tcache may not write: a directory, a name of a format it does not
    write, an existing file it did not draw (a user's image is never replaced; `ours`: a run's training.png, only
    ever tcache's), or a location that cannot take a new file."""
    out = Path(out)
    if out.is_dir():
        raise TcacheError(f"{flag} {out} is a directory; pass a file name such as {out / 'plot.png'}")
    image_format(out, flag)
    if out.exists() and not ours and not written_by_tcache(out):
        raise _not_ours(out, flag)
    # the image is written beside its target, then renamed over it: the directory must take a new file
    check_writable(out.parent if out.exists() else out, flag)


def _not_ours(out: Path, flag: str) -> TcacheError:
    return TcacheError(f"{flag} {out} exists and was not written by tcache; choose another {flag} or move it away")


def save(fig, canvas_cls, out: str | os.PathLike, flag: str | None = None) -> Path:
    """Write the figure at `out` atomically, signed as tcache's. With `flag` (a target the user named), a file
    that appeared there while drawing is checked again, so only a plot of tcache's is ever replaced."""
    out = Path(out)
    fmt = image_format(out, flag or "--out")
    tmp = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        canvas_cls(fig).print_figure(tmp, format=fmt, dpi=fig.dpi, **_signed(fmt))
        if flag is not None and out.exists() and not written_by_tcache(out):
            tmp.unlink()
            raise _not_ours(out, flag)
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):  # a read-only directory refuses the unlink too
            tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise write_error(out, e) from None
        raise TcacheError(f"cannot write the plot {out} ({e.strerror or e}); pass a writable path") from None
    return out
