"""verify_cache: check every byte and value of a cache against its manifest, and report what is wrong."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from tcache.teachercache import schema
from tcache.teachercache.reader import hash_file
from tcache.teachercache.codecs import decode_hidden
from tcache.teachercache.consistency import header_problems, manifest_problems, teacher_problems
from tcache.teachercache.manifest import Manifest, ShardInfo, read_manifest

# fp16 rounds a log-prob just below 0 to at most this much above it.
LOGPROB_SLACK = 1e-3
# Value checks read this many bytes of decoded values at a time, so a cache of any row size fits in memory.
BLOCK_BYTES = 64 << 20

Progress = Callable[[int, int], None]
"""on_progress(bytes hashed so far, bytes to hash in all)."""


def _first(bad: np.ndarray, start: int) -> int:
    """The shard row of the first True in a (rows, ...) block mask that starts at shard row `start`."""
    return start + int(np.argwhere(bad.reshape(bad.shape[0], -1).any(1))[0, 0])


def _check_values(f: h5py.File, m: Manifest, rows: int, present: set[str]) -> list[str]:
    """Value sanity of the datasets that passed the shape checks; one problem per kind, first row named."""
    specs = m.field_specs()
    problems: dict[str, str] = {}  # key: kind of problem, so a corrupt shard gives one line per kind

    def flag(key: str, text: str) -> None:
        problems.setdefault(key, text)

    per_row = sum(int(np.prod(s.row_shape)) * 4 for s in specs.values())  # as float32 / int64-ish
    if schema.HIDDEN in specs:
        per_row += int(np.prod(specs[schema.HIDDEN].row_shape)) * 4 * 2  # nf4 decodes to 2 values a byte
    block = max(1, BLOCK_BYTES // max(per_row, 1))
    hidden_dtype = specs[schema.HIDDEN].dtype if schema.HIDDEN in specs else None
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        data = {name: f[name][start:stop] for name in present}
        for name in (schema.INPUT_IDS, schema.TOPK_IDS):
            if name in data:
                ids = data[name].astype(np.int64)
                bad = (ids < 0) | (ids >= m.vocab_size)
                if bad.any():
                    flag(name, f"ids out of range in {name} (row {_first(bad, start)}: "
                               f"{int(ids[bad][0])}, vocab {m.vocab_size})")
        if schema.TOPK_LOGPROBS in data:
            lp = data[schema.TOPK_LOGPROBS].astype(np.float32)
            finite = np.isfinite(lp)
            if not finite.all():
                flag("lp-finite", f"topk_logprobs not finite (row {_first(~finite, start)})")
            pos = finite & (lp > LOGPROB_SLACK)
            if pos.any():
                flag("lp-positive", f"topk_logprobs positive (row {_first(pos, start)}: {float(lp[pos][0]):.3g})")
            # fp16 rounding is monotonic, so values sorted before storing stay sorted: no slack needed
            rising = np.diff(lp, axis=-1) > 0
            if rising.any():
                flag("lp-sorted", f"topk_logprobs not sorted descending along k (row {_first(rising, start)})")
        if schema.HIDDEN_SCALE in data:
            scale = data[schema.HIDDEN_SCALE].astype(np.float32)
            bad = ~np.isfinite(scale) | (scale < 0)
            if bad.any():
                flag("scale", f"hidden_scale not finite or negative (row {_first(bad, start)})")
        if schema.HIDDEN in data and (schema.HIDDEN_SCALE in data or schema.HIDDEN_SCALE not in specs):
            with np.errstate(all="ignore"):  # inf * 0 and friends: what we are looking for, not a warning
                h = decode_hidden(data, hidden_dtype)
            bad = ~np.isfinite(h)
            if bad.any():
                flag("hidden", f"hidden not finite (row {_first(bad, start)})")
    return list(problems.values())


def _check_shard(root: Path, m: Manifest, shard: ShardInfo, on_bytes: Callable[[int], None]) -> dict:
    path = root / shard.file
    report: dict[str, Any] = {"file": shard.file, "rows": shard.rows, "bytes": shard.bytes, "ok": False,
                              "problems": []}
    problems = report["problems"]
    if not path.is_file():
        problems.append("missing")
        on_bytes(shard.bytes)  # nothing to hash: count it as done so progress still ends at 100%
        return report
    size = path.stat().st_size
    if size != shard.bytes:
        problems.append(f"{size} bytes, manifest says {shard.bytes}")
    hashed = 0

    def count(n: int) -> None:
        nonlocal hashed
        hashed += n
        on_bytes(n)

    try:
        if hash_file(path, count) != shard.sha256:
            problems.append("sha256 mismatch")
    except OSError as e:
        problems.append(f"unreadable ({e.strerror or e})")
    on_bytes(shard.bytes - hashed)  # a truncated or grown file: keep the total what the manifest promised
    # A shard whose hash fails is still checked, so the report says what changed.
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        problems.append(f"does not open as HDF5 ({str(e).splitlines()[0]})")
        return report
    with f:
        header, present = header_problems(f, m, shard)
        problems += header
        try:
            problems += _check_values(f, m, shard.rows, present)
        except OSError as e:  # h5py cannot read a chunk whose metadata was damaged
            problems.append(f"data unreadable ({str(e).splitlines()[0]})")
    report["ok"] = not problems
    return report


def _check_teacher_file(root: Path, rel: str, sha256: str | None, on_bytes: Callable[[int], None],
                        presence: str | None) -> dict:
    """One teacher file: `presence` is teacher_problems' word for it (missing, or not listed), `sha256` None
    where the manifest has none to check."""
    path = root / rel
    report: dict[str, Any] = {"file": rel, "bytes": path.stat().st_size if path.is_file() else None,
                              "ok": False, "problems": [presence] if presence else []}
    if path.is_file() and sha256 is not None:
        try:
            if hash_file(path, on_bytes) != sha256:
                report["problems"].append("sha256 mismatch")
        except OSError as e:
            report["problems"].append(f"unreadable ({e.strerror or e})")
    report["ok"] = not report["problems"]
    return report


def verify_cache(cache_dir: str | os.PathLike, on_progress: Progress | None = None) -> dict:
    """Check the manifest against itself and the directory (its rows against its shards', the fields' row shapes
    against seq_len and top_k, its shard list against the shard files present), each shard of the manifest
    (presence, size, sha256, HDF5 datasets, shapes, dtypes, values) and each teacher file it lists or a student
    needs (presence, sha256). A manifest that does not load raises TcacheError; everything else is reported:

        {"cache", "ok", "manifest_problems": [str], "rows", "bytes", "shards_total", "shards_bad",
         "teacher_files_total", "teacher_files_bad", "shards": [{"file", "rows", "bytes", "ok", "problems": [str]}],
         "teacher_files": [{"file", "bytes", "ok", "problems": [str]}]}
    """
    root = Path(cache_dir)
    m = read_manifest(root)  # nothing it says about the files is trusted: each is checked and reported below
    teacher_bytes = sum((root / rel).stat().st_size for rel in m.teacher_files if (root / rel).is_file())
    total = sum(s.bytes for s in m.shards) + teacher_bytes
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    manifest = manifest_problems(root, m)
    shards = [_check_shard(root, m, s, on_bytes) for s in m.shards]
    presence = teacher_problems(root, m, needed=True)
    teacher = [_check_teacher_file(root, rel, m.teacher_files.get(rel), on_bytes, presence.get(rel))
               for rel in sorted(set(m.teacher_files) | set(presence))]
    shards_bad = sum(not s["ok"] for s in shards)
    teacher_bad = sum(not t["ok"] for t in teacher)
    return {
        "cache": str(root),
        "ok": not manifest and shards_bad == 0 and teacher_bad == 0,
        "manifest_problems": manifest,
        "rows": sum(s.rows for s in m.shards),
        "bytes": sum(s.bytes for s in m.shards),
        "shards_total": len(shards),
        "shards_bad": shards_bad,
        "teacher_files_total": len(teacher),
        "teacher_files_bad": teacher_bad,
        "shards": shards,
        "teacher_files": teacher,
    }
