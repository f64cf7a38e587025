"""Disk space: the exact bytes a build will write, checked against --out's free space before it starts."""

from __future__ import annotations

import os
from pathlib import Path

from tcache import outdir
from tcache.teachercache import schema
from tcache.errors import TcacheError
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.setup import TeacherSetup, full_weights_bytes, tied_head, weights_dtype
from tcache.units import fmt_bytes


def teacher_files_bytes(ts: TeacherSetup) -> int:
    """teacher/: the full weights in their checkpoint dtype (the hybrid recipe copies the whole teacher), and
    embeddings.safetensors in the same dtype: the embedding (V, D), the head (V, D) unless tied, the norm (D,)."""
    matrices = 1 if tied_head(ts.model) else 2
    size = weights_dtype(ts.model, ts.config).itemsize
    return full_weights_bytes(ts.model, ts.config) + (matrices * ts.vocab_size + 1) * ts.hidden_size * size


def bytes_needed(cfg: BuildConfig, ts: TeacherSetup, rows: int) -> int:
    """Disk a build of `rows` more rows needs: exact field bytes, plus 2% and 1 MiB for HDF5's chunk index
    and the manifest, plus the teacher files."""
    per_row = sum(s.bytes_per_row for s in ts.specs.values())
    return int(per_row * rows * 1.02) + 2**20 + teacher_files_bytes(ts)


def teacher_bytes_on_disk(work: Path) -> int:
    """Bytes of teacher files an interrupted build already wrote: a resumed build rewrites each in place."""
    tdir = work / schema.TEACHER_DIR
    return sum(f.stat().st_size for f in tdir.rglob("*") if f.is_file()) if tdir.is_dir() else 0


def check_free_space(cfg: BuildConfig, ts: TeacherSetup, work: Path, rows: int) -> None:
    """Refuse a build (or the rest of a resumed one: `rows` still to write) that cannot fit in --out's free space.
    Only what remains counts: the complete shards and teacher files already on disk are not written again."""
    need = max(bytes_needed(cfg, ts, rows) - min(teacher_bytes_on_disk(work), teacher_files_bytes(ts)), 0)
    free = outdir.free_bytes(work)
    # TCACHE_NO_SPACE_CHECK=1: for filesystems that misreport free space (some network mounts, quotas)
    if need > free and os.environ.get("TCACHE_NO_SPACE_CHECK") != "1":
        raise TcacheError(f"--out {cfg.out}: this build needs {fmt_bytes(need)} more ({rows:,} rows of "
                          f"{cfg.seq_len} tokens and the teacher files) but its filesystem has "
                          f"{fmt_bytes(free)} free; free space, lower --tokens, or choose another --out")
