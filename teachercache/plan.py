"""`tcache plan`: what a build will take, before running it: exact bytes, and a time from a short run of the
build's own loop (build.run_loop) with the same options, into a temporary directory next to --out."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tcache import outdir
from tcache.writefaults import write_error
from tcache.teachercache.build import LoopStats, cache_manifest, packed_rows, run_loop
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.setup import auto_batch_size, teacher_and_pool
from tcache.teachercache.space import bytes_needed, teacher_files_bytes
from tcache.teachercache.writer import BuildState, CacheWriter


def plan(cfg: BuildConfig, measure_batches: int = 4, measure_seconds: float = 3.0) -> dict:
    """Bytes by field and disk needed, and the build's time: the build's loop runs a warm-up batch and then
    timed ones, at least `measure_batches` and `measure_seconds` of them (fast batches, as on a GPU, are too
    short to time a few), exactly as the build would (tokenisation ahead, teacher, shard writes behind it, real
    shards). The build's time is that run's seconds plus the remaining rows at the timed pace."""
    with teacher_and_pool(cfg) as (ts, pool):
        specs = ts.specs
        per_token = {name: s.bytes_per_row / cfg.seq_len for name, s in specs.items()}
        bytes_per_token = sum(per_token.values())
        tokens = cfg.rows * cfg.seq_len
        teacher_bytes = teacher_files_bytes(ts)
        need, free = bytes_needed(cfg, ts, cfg.rows), outdir.free_bytes(Path(cfg.out))
        batch_size = cfg.batch_size or auto_batch_size(ts.device, cfg.seq_len, ts.vocab_size, ts.hidden_size)

        rows = packed_rows(cfg, ts.tokenizer, pool, 0, cfg.rows)

        def enough(marks: list) -> bool:  # marks[0] ends the warm-up batch
            return len(marks) > measure_batches and marks[-1][0] - marks[0][0] >= measure_seconds
        parent = Path(cfg.out).resolve().parent
        try:  # the probe writes where the build will, to time that disk
            parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=parent, prefix=".tcache-plan-") as tmp:
                writer = CacheWriter(Path(tmp) / "cache", cache_manifest(cfg, ts), BuildState({}, batch_size))
                stats = run_loop(cfg, ts, writer, rows, batch_size, 0, pool, enough=enough)
        except OSError as e:  # a read-only or full disk: what the build would meet too, said in one line
            raise write_error(f"--out {cfg.out}", e) or e from None
        measured, estimated, bound_by = _extrapolate(stats, cfg, batch_size, bytes_per_token)

    return {
        "disk_needed_bytes": need, "disk_free_bytes": free, "fits": need <= free,
        "teacher": cfg.teacher, "device": str(ts.device), "dtype": str(ts.dtype).removeprefix("torch."),
        "tokens": tokens, "rows": cfg.rows, "seq_len": cfg.seq_len, "top_k": cfg.top_k,
        "hidden_groups": cfg.hidden_groups, "batch_size": batch_size,
        "fields": {n: {"dtype": specs[n].dtype, "bytes_per_token": b} for n, b in per_token.items()},
        "bytes_per_token": bytes_per_token,
        "shard_bytes": int(bytes_per_token * tokens), "teacher_files_bytes": teacher_bytes,
        "total_bytes": int(bytes_per_token * tokens) + teacher_bytes,
        "measured": measured,
        "estimated_seconds": estimated, "bound_by": bound_by,
    }


def _extrapolate(stats: LoopStats, cfg: BuildConfig, batch_size: int, bytes_per_token: float
                 ) -> tuple[dict, float, str]:
    """(measured, estimated seconds of the build's loop, what sets its pace).

    The sample run's seconds already hold the fixed costs (teacher files, the warm-up batch, the last shard's
    close and hash); every further row costs what a timed batch took, per row: the interval between batches
    handed to the writer, or the writer's own time per row if that is longer (its queue hides it only so long).
    """
    marks, rows_run = stats.marks, max(stats.rows, 1)
    writer_s_per_row = stats.writer_busy_s / rows_run
    if len(marks) >= 2:
        (t0, rows_w0, writer_w0), (t1, rows_w1, writer_w1) = marks[0], marks[-1]
        timed_rows = (len(marks) - 1) * batch_size
        loop_s_per_row = (t1 - t0) / timed_rows
        waits = {"tokenizer": rows_w1 - rows_w0, "disk": writer_w1 - writer_w0}
        teacher_s = max(t1 - t0 - sum(waits.values()), 1e-9)
    else:  # a budget of one batch: nothing to extrapolate
        timed_rows, loop_s_per_row = rows_run, stats.seconds / rows_run
        waits, teacher_s = {"tokenizer": 0.0, "disk": 0.0}, stats.seconds
    s_per_row = max(loop_s_per_row, writer_s_per_row)
    estimated = stats.seconds + max(cfg.rows - stats.rows, 0) * s_per_row
    if writer_s_per_row > loop_s_per_row:
        bound_by = "disk"
    else:
        bound_by = max([("teacher", teacher_s), *waits.items()], key=lambda kv: kv[1])[0]
    disk_bytes_s = stats.bytes_written / max(stats.writer_busy_s, 1e-9)
    measured = {
        "tokens": stats.rows * cfg.seq_len,  # the sample run's, warm-up batch included
        "batches": len(marks),
        "seconds": stats.seconds,  # the sample run's loop, as the manifest's build.seconds counts it
        "build_tokens_per_s": cfg.seq_len / max(s_per_row, 1e-12),  # the loop's pace after the warm-up batch
        "teacher_tokens_per_s": timed_rows * cfg.seq_len / teacher_s,  # teacher + encoding, waits excluded
        "waited_for_rows_s": waits["tokenizer"],
        "waited_for_writer_s": waits["disk"],
        "disk_bytes_per_s": disk_bytes_s,  # the writer thread's rate (HDF5 writes, shard closes)
        "disk_tokens_per_s": disk_bytes_s / bytes_per_token,
    }
    return measured, estimated, bound_by
