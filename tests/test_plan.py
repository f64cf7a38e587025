"""`tcache plan` runs the build's own loop on a few batches and extrapolates its marks: what the estimate is made
of (the sample run's seconds + the remaining rows at the pace of its timed batches), checked without racing
the wall clock."""

from __future__ import annotations

import pytest

from conftest import text_head
from tcache.teachercache import build as build_mod
from tcache.teachercache import plan as plan_mod
from tcache.teachercache.build import LoopStats
from tcache.teachercache.config import BuildConfig
from tcache.text import DataSpec

SEQ, BATCH = 64, 4


def _cfg(tmp_path, teacher, rows: int, data: str = "unused.jsonl") -> BuildConfig:
    return BuildConfig(teacher=str(teacher), data=DataSpec(str(data)), out=str(tmp_path / "cache"), tokens=rows * SEQ,
                       seq_len=SEQ, top_k=4, batch_size=BATCH, rows_per_shard=8, device="cpu")


def test_plan_estimate_is_the_sample_seconds_plus_remaining_rows_at_the_timed_pace(tmp_path):
    """Known marks in, the documented arithmetic out: the warm-up batch (marks[0]) is not timed, the sample's
    seconds hold the fixed costs, the remaining rows go at the slower of the loop's pace between marks and the
    writer's time per row, and the waits name what bounds it. Catches an estimator that counts the warm-up
    batch as timed (len(marks) instead of len(marks) - 1 batches), drops the fixed costs, extrapolates all
    rows instead of the remaining ones, or ignores a writer slower than the loop."""
    cfg = _cfg(tmp_path, "unused", rows=100)
    bpt = 30.0  # bytes per token
    # warm-up batch ends at 1.0 s; 4 timed batches (16 rows) in 2.0 s: 0.125 s a row
    marks = [(1.0, 0.2, 0.0), (1.5, 0.25, 0.0), (2.1, 0.3, 0.05), (2.5, 0.3, 0.05), (3.0, 0.4, 0.1)]
    stats = LoopStats(seconds=3.6, rows=5 * BATCH, marks=marks, writer_busy_s=1.0, bytes_written=3000)
    measured, est, bound = plan_mod._extrapolate(stats, cfg, BATCH, bpt)
    assert est == pytest.approx(3.6 + (100 - 20) * 2.0 / 16, rel=1e-12)  # 13.6 s
    assert bound == "teacher"  # 2.0 s timed, 0.2 s waiting for rows, 0.1 s for the writer
    assert measured["batches"] == 5 and measured["tokens"] == 20 * SEQ and measured["seconds"] == 3.6
    assert measured["build_tokens_per_s"] == pytest.approx(SEQ / 0.125, rel=1e-12)
    assert measured["teacher_tokens_per_s"] == pytest.approx(16 * SEQ / (2.0 - 0.2 - 0.1), rel=1e-12)
    assert measured["waited_for_rows_s"] == pytest.approx(0.2) and measured["waited_for_writer_s"] == pytest.approx(0.1)
    assert measured["disk_bytes_per_s"] == pytest.approx(3000 / 1.0)
    assert measured["disk_tokens_per_s"] == pytest.approx(3000 / 1.0 / bpt)

    # a writer slower than the loop (0.2 s a row over the 20 rows it wrote) sets the pace
    slow_disk = LoopStats(seconds=3.6, rows=20, marks=marks, writer_busy_s=4.0, bytes_written=3000)
    _, est, bound = plan_mod._extrapolate(slow_disk, cfg, BATCH, bpt)
    assert est == pytest.approx(3.6 + 80 * 0.2, rel=1e-12) and bound == "disk"

    # most of the timed interval spent waiting for tokenised rows
    starved = [(1.0, 0.0, 0.0), (2.0, 0.9, 0.0), (3.0, 1.8, 0.0)]
    _, est, bound = plan_mod._extrapolate(LoopStats(3.2, 12, starved, 0.1, 100), cfg, BATCH, bpt)
    assert est == pytest.approx(3.2 + 88 * 2.0 / 8, rel=1e-12) and bound == "tokenizer"

    # a budget of one batch: the sample's own pace, fixed costs included
    _, est, _ = plan_mod._extrapolate(LoopStats(2.0, 4, [(1.5, 0.0, 0.0)], 0.1, 100), cfg, BATCH, bpt)
    assert est == pytest.approx(2.0 + 96 * 2.0 / 4, rel=1e-12)

    # a sample that already covers every row: its seconds are the estimate
    _, est, _ = plan_mod._extrapolate(LoopStats(9.0, 100, marks, 1.0, 100), cfg, BATCH, bpt)
    assert est == pytest.approx(9.0, rel=1e-12)


def test_plan_times_the_build_loops_own_batches(tmp_path, tiny_teacher, valid_jsonl, monkeypatch):
    """plan's sample run is build.run_loop itself (the function, not a copy), with the real writer: one mark per
    batch that the teacher ran and the writer took (warm-up + measure_batches timed ones, `enough` stopping it),
    in order, within the run's seconds; and plan's estimate is exactly the arithmetic above on those marks.
    Catches a sample run whose marks are not one per batch of the loop (e.g. every other batch) or an estimate
    made from anything but the loop's marks."""
    assert plan_mod.run_loop is build_mod.run_loop
    seen: dict = {"teacher": 0, "rows": 0}
    real_loop, real_call = plan_mod.run_loop, build_mod.TeacherPass.__call__
    real_add = plan_mod.CacheWriter.add

    def loop(*args, **kw):
        seen["stats"] = real_loop(*args, **kw)
        return seen["stats"]

    def call(self, ids):
        seen["teacher"] += 1
        return real_call(self, ids)

    def add(self, batch):
        seen["rows"] += len(batch["input_ids"])
        return real_add(self, batch)

    monkeypatch.setattr(plan_mod, "run_loop", loop)
    monkeypatch.setattr(build_mod.TeacherPass, "__call__", call)
    monkeypatch.setattr(plan_mod.CacheWriter, "add", add)
    data = text_head(valid_jsonl, tmp_path / "text.jsonl", 20_000)
    cfg = _cfg(tmp_path, tiny_teacher, rows=64, data=data)
    p = plan_mod.plan(cfg, measure_batches=4, measure_seconds=0.0)
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob(".tcache-plan-*"))  # nothing is left

    stats = seen["stats"]
    marks = stats.marks
    assert len(marks) == seen["teacher"] == 5  # the warm-up batch + 4 timed ones, then `enough`
    assert stats.rows == seen["rows"] == 5 * BATCH
    assert all(a[0] < b[0] for a, b in zip(marks, marks[1:])) and 0 < marks[-1][0] <= stats.seconds
    assert all(a[1] <= b[1] and a[2] <= b[2] for a, b in zip(marks, marks[1:]))  # waits only add up
    assert p["measured"]["batches"] == 5 and p["measured"]["tokens"] == 5 * BATCH * SEQ
    assert p["measured"]["seconds"] == stats.seconds
    pace = max((marks[-1][0] - marks[0][0]) / (4 * BATCH), stats.writer_busy_s / stats.rows)
    assert p["estimated_seconds"] == pytest.approx(stats.seconds + (64 - 5 * BATCH) * pace, rel=1e-12)
