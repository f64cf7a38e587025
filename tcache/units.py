"""Counts and byte sizes as users write them (512M tokens, 16GB) and as tcache prints them (1.5 KiB)."""

from __future__ import annotations

import re

from tcache.errors import TcacheError

_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_count(text: str | int, flag: str = "--tokens") -> int:
    """'512M' -> 512_000_000, '2.5k' -> 2500, '100000' -> 100000 (decimal units, as token budgets are quoted)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", str(text).replace("_", ""))
        if not m:
            raise TcacheError(f"{flag} {text!r} is not a count; write e.g. 100000, 2.5k, 512M or 1B")
        value = int(round(float(m.group(1)) * _COUNT_SUFFIX[m.group(2).lower()]))
    if value <= 0:
        raise TcacheError(f"{flag} must be positive, got {text!r}")
    return value


def parse_bytes(text: str, flag: str = "--max-gpu-memory") -> int:
    """'16GB' -> 16e9, '15.5GiB' -> 15.5 * 2^30."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _BYTE_UNITS or float(m.group(1)) <= 0:
        raise TcacheError(f"{flag} {text!r} is not a size; write e.g. 16GB or 15.5GiB")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])


def fmt_bytes(n: float, digits: int = 1) -> str:
    """1536 -> '1.5 KiB' (binary units, as free space is reported)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.{digits}f} TiB"
