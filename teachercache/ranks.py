"""A build under torchrun: rank r caches every W-th shard of the rows (shards r, r + W, ...), in the global row
order, as an ordinary build in OUT/.rank-r (its own shards, build state and --resume); after a barrier rank 0 moves
every shard into OUT under its global name, moves the teacher parts once, and writes the one manifest, last,
recording the world size and which rank wrote each shard.

    rows [0, N) -> shards of --shard-rows rows -> shard s is rank s % W's

Interleaved, not contiguous, shares: every rank must tokenise and pack the rows before its own (packing fixes the
row order), and between its shards that happens in the background while its teacher runs; a contiguous share would
make rank W - 1 tokenise (W - 1) / W of the data before its first batch, its GPU idle (measured: 0.85x per GPU at
W = 2, benchmarks/results/multigpu-h200x2). The cache is shard for shard the one a single process writes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

from tcache import dist, outdir, ownership
from tcache.device import resolve_device
from tcache.teachercache import schema
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.manifest import Manifest, ShardInfo, load_manifest
from tcache.teachercache.writer import CACHE_ENTRIES

RANK_DIR = ".rank-{}"


def share_rows(rows: int, rows_per_shard: int, world: int, rank: int) -> int:
    """Rows of rank `rank`'s share: shards s = rank, rank + world, ... of the `rows`."""
    return sum(min(rows_per_shard, rows - s * rows_per_shard)
               for s in range(rank, math.ceil(rows / rows_per_shard), world))


def build_ranks(cfg: BuildConfig, on_progress=None) -> Manifest:
    """This rank's share, then (rank 0) the merge. Every rank returns the cache's manifest."""
    from tcache.teachercache.build import build_share
    from tcache.teachercache.resume import work_dir

    device = dist.init(resolve_device(cfg.device))
    work = dist.broadcast(_prepare(cfg, work_dir) if dist.is_main() else None)
    n = share_rows(cfg.rows, cfg.rows_per_shard, dist.world(), dist.rank())
    sub = work / RANK_DIR.format(dist.rank())
    if n and not (sub / schema.MANIFEST_FILE).exists():  # a rank whose share is complete skips it
        sub_cfg = dataclasses.replace(cfg, out=str(sub), tokens=n * cfg.seq_len, share_rank=dist.rank(),
                                      share_world=dist.world(), device=str(device), overwrite=False,
                                      resume=(sub / outdir.BUILD_STATE).exists())
        build_share(sub_cfg, on_progress if dist.is_main() else None)
    dist.barrier()
    if dist.is_main():
        _merge(cfg, work)
        if work != Path(cfg.out):
            outdir.swap_in(work, Path(cfg.out))
    dist.barrier()
    return load_manifest(cfg.out)


def _prepare(cfg: BuildConfig, work_dir) -> Path:
    """Rank 0: where the cache is built (--out, or its staging sibling for --overwrite), as a single build decides;
    a --resume keeps the ranks' sub-builds."""
    work = work_dir(cfg) if not cfg.resume else Path(cfg.out)
    outdir.check_writable(work)
    ownership.claim(work, "cache", CACHE_ENTRIES + tuple(RANK_DIR.format(r) for r in range(dist.world())))
    return work


def _merge(cfg: BuildConfig, work: Path) -> None:
    """Shards into `work` in rank order under global names; the teacher parts from the first rank; the manifest
    last. Idempotent: a merge cut short is finished by the next run (shards already moved are not moved again)."""
    W = dist.world()
    subs = [work / RANK_DIR.format(r) for r in range(W)]
    parts = {r: load_manifest(s) for r, s in enumerate(subs) if (s / schema.MANIFEST_FILE).exists()}
    first = parts[0]
    shards, ranks = [], []
    while True:  # global shard g is shard g // W of rank g % W; the data may have ended before the budget
        g = len(shards)
        r, local = g % W, g // W
        if r not in parts or local >= len(parts[r].shards):
            break
        sh, name = parts[r].shards[local], schema.shard_name(g)
        ownership.register(work, name)
        if (subs[r] / sh.file).exists():
            os.replace(subs[r] / sh.file, work / name)
        shards.append(ShardInfo(name, sh.rows, sh.bytes, sh.sha256))
        ranks.append(r)
    seconds = [parts[r].build.get("seconds") or 0.0 for r in sorted(parts)]
    if (subs[0] / schema.TEACHER_DIR).exists():
        shutil.rmtree(work / schema.TEACHER_DIR, ignore_errors=True)
        os.replace(subs[0] / schema.TEACHER_DIR, work / schema.TEACHER_DIR)
    from tcache import configfile

    configfile.write(cfg, work / configfile.CONFIG_FILE, "build")
    rows = sum(s.rows for s in shards)
    manifest = dataclasses.replace(
        first, shards=shards, rows=rows, tokens=rows * cfg.seq_len, tokens_requested=cfg.tokens,
        data_exhausted=rows < cfg.rows,
        build={**first.build, "world_size": dist.world(), "shard_ranks": ranks, "rank_seconds": seconds,
               "seconds": max(seconds), "resumed_at_row": None,
               "tokens_per_s": round(rows * cfg.seq_len / max(max(seconds), 1e-9), 1)})
    tmp = work / (schema.MANIFEST_FILE + schema.PARTIAL_SUFFIX)
    tmp.write_text(manifest.to_json())
    os.replace(tmp, work / schema.MANIFEST_FILE)
    outdir.fsync_dir(work)
    for s in subs:  # after the manifest: until then they are what a rerun finishes the merge from
        shutil.rmtree(s, ignore_errors=True)
    ownership.seal(work)
