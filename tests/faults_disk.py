"""Promises about full disks and read-only targets on every write path (issue 34): distill's student, export's
staging folder, plan's probe, and a build resumed once the disk has room for its remaining shards only. The faults
of the rows in tests/test_reliability.py (DISK_FAULTS there); real tmpfs and read-only mounts where the row needs
root, as tests/faults_inputs.py makes them."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from faults_inputs import _read_only, _root_mount
from promises import Case


def _small_tmpfs(case: Case, name: str, size: int) -> Path:
    """A tmpfs of `size` bytes (rounded up to pages) at case.tmp / name."""
    mnt = case.tmp / name
    mnt.mkdir()
    _root_mount(case, "-t", "tmpfs", "-o", f"size={-(-size // 4096) * 4096}", "tmpfs", str(mnt))
    return mnt


def _size(root: Path, but: str | None = None) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != but)


def distill_into_a_full_disk(case: Case) -> list[str]:
    """A filesystem with room for the run's config, metrics and plot but only half the student's weights."""
    run = Path(case.fixtures["run"])
    weights = (run / "model.safetensors").stat().st_size
    mnt = _small_tmpfs(case, "full", _size(run, but="model.safetensors") + weights // 2)
    return ["distill", str(case.fixtures["cache"]), "--out", str(mnt / "run"), "--recipe", "v2", "--steps", "1",
            "--batch-size", "2", "--grad-accum", "1", "--device", "cpu"]


def no_student_left(case: Case) -> None:
    """The run directory holds no weights that could pass for a student, and no student.json."""
    run = case.tmp / "full" / "run"
    assert not (run / "model.safetensors").exists() and not (run / "student.json").exists(), list(run.iterdir())


def export_over_an_export_on_a_full_disk(case: Case) -> list[str]:
    """An earlier export on a filesystem with room for half of another: `export --overwrite` builds its
    replacement beside it and meets the full disk."""
    export = Path(case.fixtures["export"])
    mnt = _small_tmpfs(case, "full", _size(export) * 3 // 2)
    shutil.copytree(export, mnt / "hf")
    return ["export", str(case.fixtures["run"]), "--out", str(mnt / "hf"), "--overwrite"]


def earlier_export_kept_and_no_staging(case: Case) -> None:
    export, hf = Path(case.fixtures["export"]), case.tmp / "full" / "hf"
    for p in export.rglob("*"):
        if p.is_file():
            assert (hf / p.relative_to(export)).read_bytes() == p.read_bytes(), p
    left = [p.name for p in (case.tmp / "full").iterdir() if p.name != "hf"]
    assert not left, left  # the staging folder .hf.tcache-new was removed


def plan_out_on_a_read_only_mount(case: Case) -> list[str]:
    f = case.fixtures
    return ["plan", "--teacher", str(f["tiny_teacher"]), "--data", str(f["valid_jsonl"]), "--tokens", "1k",
            "--seq-len", "64", "--top-k", "4", "--device", "cpu", "--out", str(_read_only(case) / "c")]


def teacher_rewrite_meets_the_full_disk(case: Case, free: int) -> None:
    """What a disk with `free` bytes does to a resumed build that writes the teacher files again: safetensors
    writes a whole new file beside the old one, so a disk freed just enough for the missing shards is full again
    (seen on an 80 MB tmpfs in issue 34). A build that resumes only writes what remains, so this never runs."""
    import tcache.teachercache.build as build

    teacher = _size(case.tmp / "c" / "teacher")
    assert free < teacher, (free, teacher)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    case.fixtures["monkeypatch"].setattr(build, "save_teacher_parts", full)


def plot_onto_a_full_disk(case: Case) -> list[str]:
    """A filesystem with 8 KiB free: less than any plot."""
    mnt = _small_tmpfs(case, "full", 40960)
    (mnt / "filler").write_bytes(bytes(32768))
    return ["plot", str(case.fixtures["run"]), "--out", str(mnt / "curves.png")]


def distill_checkpoint_onto_a_full_disk(case: Case) -> list[str]:
    """64 KiB: room for the run's config and metrics, not for its first checkpoint (the trainable weights and
    their optimizer state, 0.4 MiB)."""
    mnt = _small_tmpfs(case, "full", 65536)
    return ["distill", str(case.fixtures["cache"]), "--out", str(mnt / "run"), "--recipe", "v2", "--steps", "2",
            "--ckpt-every", "1", "--batch-size", "2", "--grad-accum", "1", "--device", "cpu"]


def no_partial_checkpoint(case: Case) -> None:
    ckpts = case.tmp / "full" / "run" / "checkpoints"
    left = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
    assert not left, left
