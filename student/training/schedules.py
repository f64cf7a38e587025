"""Schedules as pure functions of (epoch, step): no state, so resume needs only the step counters."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Anneal:
    """A Delta-distillation schedule for one coefficient (alpha, beta or the temperature T)."""

    start: float
    """Value at step 0 of epoch 0."""
    final: float
    """Asymptote, and the floor that the per-epoch Delta never passes."""
    delta: float = 0.0
    """Lowered (towards `final`) by this much after each completed epoch."""

    @property
    def fixed(self) -> bool:
        return self.start == self.final


def annealed(a: Anneal, epoch: int, step_in_epoch: int) -> float:
    """v1 paper: x_k = x_final + (x_e - x_final) / (1 + log(k + 1)), x_e lowered by Delta per epoch."""
    # 1. the epoch's start value: `delta` closer to `final` per completed epoch, never beyond it
    if a.start >= a.final:
        x_e = max(a.start - a.delta * epoch, a.final)
    else:
        x_e = min(a.start + a.delta * epoch, a.final)
    # 2. within the epoch: logarithmic decay from x_e towards final (natural log; k = 0 gives x_e)
    return a.final + (x_e - a.final) / (1.0 + math.log(step_in_epoch + 1))


def window_dropout_at(start: float, final: float | None, micro: int, total: int) -> float:
    """--window-dropout at micro-batch `micro` of the run's `total`: linear from `start` at the first to `final` at
    the last (scheduled sliding-window dropout, arXiv 2510.05901, lowers it as training goes); `start` throughout
    when `final` is None."""
    if final is None or total <= 1:
        return start
    return start + (final - start) * min(micro, total - 1) / (total - 1)


def lr_at(step: int, total_steps: int, peak: float, warmup_frac: float, min_ratio: float,
          schedule: str = "cosine") -> float:
    """Linear warmup over warmup_frac of the run, then cosine from peak down to min_ratio * peak (or, for the
    constant schedule, the peak until the end)."""
    warmup = max(int(round(warmup_frac * total_steps)), 0)
    # 1. warmup: (step + 1) / warmup, so the first step already moves
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    # 2. cosine decay over the remaining steps
    span = max(total_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_anneal(text: "str | Anneal | None", flag: str, delta: float) -> "Anneal | None":
    """'0.8:0.5' -> Anneal(0.8, 0.5, delta); '0.3' -> fixed 0.3; None -> None (the recipe's default)."""
    from tcache.errors import TcacheError

    if text is None or isinstance(text, Anneal):
        return text
    try:
        parts = [float(x) for x in str(text).split(":")]
    except ValueError:
        raise TcacheError(f"{flag} {text!r} is not a number or START:FINAL pair, e.g. 0.8:0.5") from None
    if len(parts) == 1:
        return Anneal(parts[0], parts[0], 0.0)
    if len(parts) == 2:
        return Anneal(parts[0], parts[1], delta)
    raise TcacheError(f"{flag} {text!r} has too many parts; use VALUE or START:FINAL")
