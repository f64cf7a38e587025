"""The build: setup (teacher, output, space) -> the teacher loop over the budget -> manifest.

run_loop is the one loop of a build: `tcache plan` runs it too, on a few batches, so that the time it
estimates is measured on the path a build takes (same batches, tokenisation, writer and shard writes).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

import tcache
from tcache.text import DataSpec, TokenizerPool, iter_docs, iter_texts, pack_rows
from tcache import configfile, outdir, ownership
from tcache.errors import Interrupted, TcacheError
from tcache.hf import num_layers, text_config, tokenizer_sha256
from tcache.signals import StopRequest, stop_on_signals
from tcache.teachercache import schema
from tcache.teachercache.codecs import encode_fields
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.manifest import Manifest, fields_record
from tcache.teachercache.pipeline import AsyncWriter, Prefetcher, batched_rows
from tcache.teachercache.resume import build_identity, resume_state, work_dir
from tcache.teachercache.setup import TeacherSetup, auto_batch_size, save_teacher_parts, teacher_and_pool
from tcache.teachercache.space import check_free_space
from tcache.teachercache.teacher import TeacherPass
from tcache.teachercache.writer import CACHE_ENTRIES, BuildState, CacheWriter
from tcache.writefaults import is_disk_full

ProgressFn = Callable[[int, int, int], None]  # (tokens_done, tokens_budget, bytes_written)


def build(cfg: BuildConfig, on_progress: ProgressFn | None = None) -> Manifest:
    """Build (or resume) the cache at cfg.out. The first SIGINT / SIGTERM stops the build before its next
    batch (Interrupted), a second one at once; once anything was written, every exception carries
    `resumable` (and a note) and the state stays for --resume."""
    from tcache import dist, locks

    outdir.check_writable(Path(cfg.out))
    with locks.locked(cfg.out):  # one command per output, for the whole build
        if dist.world() > 1:
            from tcache.teachercache.ranks import build_ranks

            return build_ranks(cfg, on_progress)  # under torchrun: each rank its share (build_share), one manifest
        return build_share(cfg, on_progress)


def build_share(cfg: BuildConfig, on_progress: ProgressFn | None = None) -> Manifest:
    """The single-process build of cfg's rows: all of them, or a rank's share (cfg.share_rank of cfg.share_world)."""
    with stop_on_signals(graceful=True) as stop:
        # 1. setup: every check that can fail runs before anything is written
        work = work_dir(cfg)
        outdir.check_writable(work)
        with teacher_and_pool(cfg) as (ts, pool):
            if stop.requested:
                raise Interrupted(stop.signum, "nothing was written")
            manifest = _build(cfg, work, ts, pool, on_progress, stop)
        if work != Path(cfg.out):
            outdir.swap_in(work, Path(cfg.out))
        return manifest


def _build(cfg: BuildConfig, work: Path, ts: TeacherSetup, pool: TokenizerPool | None,
           on_progress: ProgressFn | None, stop: StopRequest) -> Manifest:
    identity = _identity(cfg, ts)
    state = resume_state(cfg, work, identity) if cfg.resume else None
    batch_size = state.batch_size if state else cfg.batch_size or auto_batch_size(ts.device, cfg.seq_len,
                                                                                  ts.vocab_size, ts.hidden_size)
    rows_done = sum(s["rows"] for s in state.shards) if state else 0
    check_free_space(cfg, ts, work, max(cfg.rows - rows_done, 0))
    # A resumed build re-reads and re-tokenises the rows before its first missing one (cheap next to the
    # teacher) and restarts at a batch boundary of the original build, so every batch is the same.
    start = rows_done // batch_size * batch_size
    manifest = cache_manifest(cfg, ts)
    rows = packed_rows(cfg, ts.tokenizer, pool, start, cfg.rows, tally=manifest.dataset.get("mixture"))
    # The options, resolved, so `--config CACHE/config.yaml` repeats this build; before the shards, as the
    # manifest that marks a complete cache is written last.
    ownership.claim(work, "cache", CACHE_ENTRIES)  # tcache's marker, before anything else is written there
    configfile.write(cfg, work / configfile.CONFIG_FILE, "build")
    # 2. fit: rows are tokenised ahead in a thread, the teacher runs, shards are written behind it
    writer = CacheWriter(work, manifest, state or BuildState(identity, batch_size))
    try:
        run_loop(cfg, ts, writer, rows, batch_size, start, pool, stop, on_progress,
                 resumed_at_row=rows_done if state else None)
    except (TcacheError, Interrupted, Exception) as e:
        if is_disk_full(e):  # h5py's OSError, or safetensors' own error while writing the teacher files
            raise _resumable(writer.disk_full_error(), writer) from None
        raise _resumable(e, writer)
    return manifest


def _identity(cfg: BuildConfig, ts: TeacherSetup) -> dict:
    """build_identity; for a mixture, with every source's description and files and the shares, which fix the
    interleaving a resume must repeat (one source: exactly as before mixtures, so its builds stay resumable)."""
    if len(cfg.sources) == 1:
        return build_identity(cfg, ts)
    each = [build_identity(dataclasses.replace(cfg, data=s, data_weights=None), ts) for s in cfg.sources]
    return {**each[0], "data": [e["data"] for e in each], "data_files": [e["data_files"] for e in each],
            "data_shares": list(cfg.shares)}


def data_record(cfg: BuildConfig) -> dict:
    """The manifest's `dataset`: one source's description, or {"mixture": [per source its description, weight
    (its share, sum 1) and tokens (how many of the cache's tokens are its, filled in as rows are packed)]}."""
    if len(cfg.sources) == 1:
        return cfg.data.describe()
    # under torchrun a rank packs every row but keeps only its shards: its count would not be the cache's
    tokens = 0 if cfg.share_world == 1 else None
    return {"mixture": [{**s.describe(), "weight": w, "tokens": tokens} for s, w in zip(cfg.sources, cfg.shares)]}


class SourceRanOut(TcacheError):
    """A mixture's source has no more documents. Not resumable: a resume would run out at the same document."""


def mixed_rows(sources: tuple[DataSpec, ...], shares: tuple[float, ...], tokenizer, seq_len: int,
               pool: TokenizerPool | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of a mixture: (row (seq_len,) int32, tokens of each source in it (n,) int64), packed as pack_rows
    packs one source, from whole documents drawn one at a time from the source furthest below its share of the
    tokens drawn so far (share * drawn - its drawn, largest; a tie goes to the earlier --data). So the order
    depends only on the documents, not on the budget or the batches, and every prefix of the cache holds each
    source's share to within about one document. A source that runs out ends the build (one line naming it):
    the rest of the cache would not hold the mixture asked for. Written here rather than with
    datasets.interleave_datasets: that samples documents by probability, so the shares would hold in documents
    and in expectation, not in tokens and in every prefix."""
    eos = tokenizer.eos_token_id
    docs = [iter_docs(s, tokenizer, eos, pool) for s in sources]
    share = np.asarray(shares, dtype=np.float64)  # (n,)
    drawn = np.zeros(len(sources), dtype=np.int64)  # (n,) tokens drawn per source, EOS included
    queued: list[list] = []  # [source, ids not yet in a row], in stream order
    have = 0  # tokens queued
    while True:
        while have < seq_len:
            i = int(np.argmax(share * drawn.sum() - drawn))  # argmax: the first of equal deficits
            doc = next(docs[i], None)
            if doc is None:
                raise SourceRanOut(
                    f"--data {sources[i].path} ran out of documents after {drawn[i]:,} tokens, short of its "
                    f"{share[i]:.0%} share of the mixture; add documents to it, lower its --data-weights share, "
                    "or lower --tokens")
            drawn[i] += len(doc)
            queued.append([i, doc])
            have += len(doc)
        row = np.empty(seq_len, dtype=np.int32)
        counts = np.zeros(len(sources), dtype=np.int64)
        pos = 0
        while pos < seq_len:
            i, ids = queued[0]
            take = min(len(ids), seq_len - pos)
            row[pos:pos + take] = ids[:take]
            counts[i] += take
            pos += take
            if take == len(ids):
                queued.pop(0)
            else:
                queued[0][1] = ids[take:]  # the document goes on in the next row
        have -= seq_len
        yield row, counts


def _tallied(pairs: Iterator[tuple[np.ndarray, np.ndarray]], tally: list[dict] | None) -> Iterator[np.ndarray]:
    """The rows of `pairs`, each row's tokens per source added to the records of `tally` as it is taken: rows
    are read only as far as the build needs (the last is its last row), so the counts are the cache's."""
    for row, counts in pairs:
        if tally is not None and tally[0]["tokens"] is not None:
            for rec, c in zip(tally, counts):
                rec["tokens"] += int(c)
        yield row


def packed_rows(cfg: BuildConfig, tokenizer, pool: TokenizerPool | None, start: int, stop: int,
                tally: list[dict] | None = None) -> Iterator[np.ndarray]:
    """Packed rows start..stop-1 of the data, (seq_len,) each; a mixture's (mixed_rows) counted into `tally`,
    the manifest's mixture records. The first row is read now, and a mixture's first document of each source:
    dataset and text-field errors surface before the output directory is touched (and before a loop's clock
    starts)."""
    if len(cfg.sources) == 1:
        rows = pack_rows(iter_texts(cfg.data), tokenizer, cfg.seq_len, tokenizer.eos_token_id, pool=pool)
    else:
        for s in cfg.sources:  # the first row may hold only the first source's documents
            texts = iter_texts(s)
            empty = next(texts, None) is None
            texts.close()
            if empty:
                raise TcacheError(f"--data {s.path} holds no text; point it at documents, or drop it from the mixture")
        rows = _tallied(mixed_rows(cfg.sources, cfg.shares, tokenizer, cfg.seq_len, pool), tally)
    first = next(rows, None)
    if first is None:
        raise TcacheError(f"--data {cfg.data.path} holds fewer than {cfg.seq_len} tokens; nothing to cache")
    rows = itertools.chain([first], rows)
    if cfg.share_world > 1:  # a rank's shards: every share_world-th shard of rows_per_shard rows
        R, W, r = cfg.rows_per_shard, cfg.share_world, cfg.share_rank
        rows = (row for i, row in enumerate(rows) if (i // R) % W == r)
    return itertools.islice(rows, start, stop)


def cache_manifest(cfg: BuildConfig, ts: TeacherSetup) -> Manifest:
    """The manifest of a cache of these options before any row is written (the writer fills in the rest)."""
    config, tokenizer = ts.config, ts.tokenizer
    return Manifest(
        teacher={
            "name_or_path": cfg.teacher,
            "revision": cfg.revision or getattr(config, "_commit_hash", None),
            "model_type": config.model_type,
            "architectures": list(getattr(config, "architectures", None) or []),
            "num_attention_heads": int(getattr(text_config(config), "num_attention_heads", 0)),
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "config": config.to_dict(),
        },
        tokenizer={"sha256": tokenizer_sha256(tokenizer), "eos_token_id": int(tokenizer.eos_token_id),
                   "size": len(tokenizer)},
        dataset=data_record(cfg),
        vocab_size=ts.vocab_size, hidden_size=ts.hidden_size, num_layers=num_layers(config), seq_len=cfg.seq_len,
        top_k=cfg.top_k, hidden_groups=cfg.hidden_groups, layer_groups=ts.groups,
        rows_per_shard=cfg.rows_per_shard, tokens_requested=cfg.tokens,
        fields=fields_record(ts.specs),
    )


@dataclass
class LoopStats:
    """What one run of the loop took (plan extrapolates from it)."""

    seconds: float
    """From opening the writer to the last shard hashed: the manifest's build.seconds."""
    rows: int
    """Rows handed to the writer in this run."""
    marks: list[tuple[float, float, float]] = field(default_factory=list)
    """Per batch, when it was handed to the writer: (seconds since the start, seconds waited for rows so far,
    seconds waited for the writer so far)."""
    writer_busy_s: float = 0.0
    bytes_written: int = 0


def run_loop(cfg: BuildConfig, ts: TeacherSetup, writer: CacheWriter, rows: Iterable[np.ndarray], batch_size: int,
             start: int, pool: TokenizerPool | None, stop: StopRequest | None = None,
             on_progress: ProgressFn | None = None, resumed_at_row: int | None = None,
             enough: Callable[[list[tuple[float, float, float]]], bool] | None = None) -> LoopStats:
    """The build loop over `rows` (which start at row `start`, a batch boundary): the teacher parts, then per
    batch the teacher pass and the encoding on the device, the shard writes behind it in a thread, and the
    manifest (with its `build` record) when the writer closes. A stop request ends it between batches
    (Interrupted); `enough(marks)` returning True ends it cleanly after a batch (a plan's sample run)."""
    device, specs = ts.device, ts.specs
    teacher = TeacherPass(ts.model, ts.groups, cfg.top_k)
    t0 = time.perf_counter()
    with writer:
        rows_before = writer.rows_done
        done = rows_before * cfg.seq_len
        skip = rows_before - start  # rows of the first batch that complete shards already hold
        # under torchrun the first rank's teacher parts serve the whole cache. A resumed build with complete shards
        # wrote them before its first shard, so they are kept: safetensors rewrites a file beside the old one, and
        # the space check (space.check_free_space) counts them as written, so a disk freed just enough resumes.
        kept = writer.rows_done > 0 and (writer.out_dir / schema.EMBEDDINGS_FILE).is_file()
        if cfg.share_rank == 0 and not kept:
            save_teacher_parts(ts.model, ts.tokenizer, ts.config, writer)
        # deep enough to hold a whole tokenizer call's rows, so the next call overlaps the teacher
        batches = Prefetcher(batched_rows(rows, batch_size), depth=max(4, 1_000_000 // (batch_size * cfg.seq_len)))
        sink = AsyncWriter(writer.add)
        marks = []
        try:
            for ids_np in batches:
                if stop is not None and stop.requested:  # between batches: the writer keeps every complete shard
                    raise Interrupted(stop.signum)
                ids = torch.from_numpy(ids_np)  # (B, T) int32
                if device.type == "cuda":  # pinned + non_blocking: no wait for the GPU to drain
                    ids = ids.pin_memory().to(device, non_blocking=True)
                ids = ids.to(device=device, dtype=torch.long)
                tgt = teacher(ids)
                fields = encode_fields(ids, tgt.hidden, tgt.topk_logprobs, tgt.topk_ids, specs)
                if skip:
                    fields = {k: v[skip:] for k, v in fields.items()}  # (B - skip, ...)
                sink.put(fields)
                marks.append((time.perf_counter() - t0, batches.wait_s, sink.put_wait_s))
                done += ids.numel() - skip * cfg.seq_len
                skip = 0
                if on_progress:
                    on_progress(done, cfg.rows * cfg.seq_len, writer.bytes_written)
                if enough is not None and enough(marks):
                    break
        except BaseException:
            sink.close(raise_error=False)  # the writer thread must be idle before the shard is dropped
            raise
        finally:
            batches.close()
            teacher.close()
        sink.close()
        writer.finish()
        seconds = time.perf_counter() - t0
        # 3. the manifest is written when the `with` block closes: last, and only on success
        manifest = writer.manifest
        manifest.data_exhausted = manifest.rows < cfg.rows
        manifest.build = {
            "tcache_version": tcache.__version__,
            "torch_version": torch.__version__,
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "dtype": str(ts.dtype).removeprefix("torch."),
            "batch_size": batch_size,
            "tokenizer_workers": pool.workers if pool is not None else 0,
            "hooked_hidden": teacher.hooked,
            "resumed_at_row": resumed_at_row,
            # where the loop waited: for tokenised rows, for the writer; and how busy the writer was
            "waited_for_rows_s": round(batches.wait_s, 3),
            "waited_for_writer_s": round(sink.put_wait_s, 3),
            "writer_busy_s": round(sink.busy_s, 3),
            "seconds": round(seconds, 3),
            "tokens_per_s": round((done - rows_before * cfg.seq_len) / seconds, 1) if seconds > 0 else None,
        }
    return LoopStats(seconds, done // cfg.seq_len - rows_before, marks, sink.busy_s, writer.bytes_written)


def _resumable(e: BaseException, writer: CacheWriter) -> BaseException:
    """Mark an exception that escaped after the build state was written: the same command with --resume
    continues from the last complete shard."""
    if (writer.out_dir / outdir.BUILD_STATE).exists() and not isinstance(e, SourceRanOut):
        e.resumable = True
        if not isinstance(e, (TcacheError, Interrupted)):
            e.add_note(f"{len(writer.manifest.shards)} complete shard(s) are kept in {writer.out_dir}; "
                       "rerun the same command with --resume to continue")
    return e
