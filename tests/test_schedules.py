"""Delta-distillation schedules and the learning-rate schedule as pure functions."""

from __future__ import annotations

import math

import pytest

from tcache.student.training.schedules import Anneal, annealed, lr_at

ALPHA = Anneal(start=0.8, final=0.5, delta=0.05)


def test_step_zero_is_the_epoch_start_value():
    assert annealed(ALPHA, 0, 0) == pytest.approx(0.8)
    assert annealed(ALPHA, 1, 0) == pytest.approx(0.75)  # lowered by Delta after epoch 0
    assert annealed(ALPHA, 3, 0) == pytest.approx(0.65)


def test_within_epoch_log_decay():
    k = 999  # e.g. the last step of a 1000-step epoch
    assert annealed(ALPHA, 0, k) == pytest.approx(0.5 + 0.3 / (1 + math.log(1000)))
    assert annealed(ALPHA, 2, k) == pytest.approx(0.5 + 0.2 / (1 + math.log(1000)))


def test_asymptote_and_floor():
    assert annealed(ALPHA, 0, 10**12) == pytest.approx(0.5, abs=0.011)
    assert annealed(ALPHA, 100, 0) == pytest.approx(0.5)  # Delta never passes the final value
    temp = Anneal(2.0, 1.0, 0.05)
    assert annealed(temp, 0, 0) == 2.0 and annealed(temp, 40, 5) == pytest.approx(1.0)


def test_increasing_schedule_and_fixed_weight():
    up = Anneal(0.1, 0.3, 0.05)
    assert annealed(up, 0, 0) == pytest.approx(0.1)
    assert annealed(up, 1, 0) == pytest.approx(0.15)
    assert annealed(up, 9, 0) == pytest.approx(0.3)
    fixed = Anneal(0.4, 0.4)
    assert {annealed(fixed, e, k) for e in range(3) for k in (0, 7, 1000)} == {0.4}


def test_lr_warmup_then_cosine():
    total, peak = 100, 2e-4
    assert lr_at(0, total, peak, 0.1, 0.1) == pytest.approx(peak / 10)
    assert lr_at(9, total, peak, 0.1, 0.1) == pytest.approx(peak)
    assert lr_at(10, total, peak, 0.1, 0.1) == pytest.approx(peak)
    mid = 10 + 45
    assert lr_at(mid, total, peak, 0.1, 0.1) == pytest.approx(peak * (0.1 + 0.9 * 0.5), rel=1e-2)
    assert lr_at(100, total, peak, 0.1, 0.1) == pytest.approx(peak * 0.1)
    lrs = [lr_at(s, total, peak, 0.1, 0.1) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
