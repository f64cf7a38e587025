"""Small renderers shared by the commands."""

from __future__ import annotations

from tcache.units import fmt_bytes


def human_bytes(n: float) -> str:
    return fmt_bytes(n, digits=2)


def human_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
