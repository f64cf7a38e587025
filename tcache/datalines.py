"""Where local data stops being readable, as a user can open it: the file's first line that is not UTF-8, not
valid JSON, or whose text is not a string, or where a compressed file stops decompressing (truncated, not of its
suffix's format, corrupt). A scan written here because no library reports it: pyarrow says "JSON parse error ...
in row 2" of a block, codecs an offset, `datasets` packs a 123 as text, and a truncated .gz is a bare EOFError."""

from __future__ import annotations

import json
from pathlib import Path


# suffix -> (the format's name, the magic bytes its files start with)
_COMPRESSED = {".gz": ("gzip", b"\x1f\x8b"), ".xz": ("xz", b"\xfd7zXZ\x00"), ".bz2": ("bzip2", b"BZh")}
_NOT_SCANNED = (".zst", ".zstd")  # no zstd reader in the standard library: its bytes would read as text that is not UTF-8


def _open_text(path: str):
    """A local data file as bytes, decompressed by its suffix."""
    import bz2
    import gzip
    import lzma

    opener = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}.get(Path(path).suffix.lower(), open)
    return opener(path, "rb")


def compression_problem(path: str, e: Exception, lines: int) -> str:
    """What is wrong with a compressed file whose reading raised `e` after `lines` good lines, and what to do:
    truncated (EOFError), not of its suffix's format at all (its first bytes), or corrupt inside."""
    suffix = Path(path).suffix.lower()
    kind, magic = _COMPRESSED[suffix]
    detail = str(e).strip() or type(e).__name__
    after = f" after line {lines}" if lines else ""
    if isinstance(e, EOFError):
        return f"truncated{after} ({detail}); re-download or recompress it"
    with open(path, "rb") as f:
        head = f.read(len(magic))
    if head != magic:
        return (f"not a {kind} file ({detail}); if it is plain text, name it without {suffix}, else re-download "
                "or recompress it")
    return f"corrupt {kind} data{after} ({detail}); re-download or recompress it"


def first_bad_line(path: str, builder: str, text_field: str | None = None) -> str | None:
    """Where a local JSON-lines or text file stops being readable: 'line N: problem', or None. Run only after
    the `datasets` reader failed or gave a text that is not a string, to turn it (pyarrow's "JSON parse error
    ... in row 2", a UnicodeDecodeError, a record's 123) into the line a user can open: a scan written here
    because no library reports it. `text_field`: also report the first line whose text is not a string.
    A compressed file that cannot be decompressed (truncated, not of its suffix's format, corrupt) is its own
    problem: compression_problem."""
    import lzma
    import zlib

    suffix = Path(path).suffix.lower()
    if suffix in _NOT_SCANNED:
        return None
    n = 0
    try:
        with _open_text(path) as f:
            for n, raw in enumerate(f, 1):
                problem = _line_problem(n, raw, builder, text_field)
                if problem is not None:
                    return problem or None
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:  # gzip.BadGzipFile and bz2's are OSError
        if suffix not in _COMPRESSED or isinstance(e, FileNotFoundError):
            raise
        return compression_problem(path, e, n)  # n: the last line read whole (the error came reading the next)
    return None


def _line_problem(n: int, raw: bytes, builder: str, text_field: str | None) -> str | None:
    """What is wrong with line n, None if nothing, "" to stop the scan without a problem."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode the "
                "file as UTF-8, e.g. iconv -f latin1 -t utf-8")
    if builder == "json" and line.strip():
        if n == 1 and line.lstrip().startswith("["):
            return ""  # one JSON document, not JSON lines: the scan has nothing to say per line
        try:
            record = json.loads(line)
        except ValueError as e:
            return f"line {n} is not valid JSON ({str(e).split(':')[0]}); fix or remove that line"
        problem = wrong_text(record, text_field, True) if text_field and isinstance(record, dict) else None
        if problem:
            return f"line {n}: {problem}"
    return None


_TYPE_NAMES = {type(None): "null", bool: "a boolean", int: "an int", float: "a float", list: "a list",
               dict: "an object"}


def wrong_text(record, text_field: str, null_is_wrong: bool) -> str | None:
    """What is wrong with a record's text ('"text" is an int, not a string; fix ...'), or None for a string.
    A null is wrong in JSON, where someone wrote it; in a typed column (parquet, csv, a hub dataset) it is a
    missing value, skipped as an empty document is."""
    text = record.get(text_field)
    if isinstance(text, str) or (text is None and not null_is_wrong):
        return None
    kind = _TYPE_NAMES.get(type(text), f"a {type(text).__name__}") if text_field in record else "missing"
    return f"{json.dumps(text_field)} is {kind}, not a string; fix the data or pass --text-field"
