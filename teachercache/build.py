"""The build loop: setup (teacher, data, output) -> run the teacher over the budget -> manifest."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import tcache
from tcache.teachercache import schema
from tcache.text import DataSpec, TokenizerPool, iter_texts, pack_rows
from tcache import outdir
from tcache.units import fmt_bytes
from tcache.errors import Interrupted, TcacheError
from tcache.teachercache.pipeline import AsyncWriter, Prefetcher, batched_rows
from tcache.teachercache.codecs import encode_fields
from tcache.teachercache.manifest import Manifest, fields_record
from tcache.teachercache.teacher import TeacherPass
from tcache.hf import load_config, load_model, load_tokenizer, num_layers, text_config, tokenizer_sha256
from tcache.device import resolve_device, resolve_dtype
from tcache.signals import stop_on_signals
from tcache.teachercache.writer import BuildState, CacheWriter, is_disk_full

ProgressFn = Callable[[int, int, int], None]  # (tokens_done, tokens_budget, bytes_written)


def work_dir(cfg: BuildConfig) -> Path:
    """Where this build writes: --out itself, or (--overwrite of a cache) its staging sibling, swapped in
    when complete. Refuses anything that would delete what tcache did not write."""
    out = Path(cfg.out)
    k = outdir.classify(out, "cache")
    if k in ("missing", "empty"):
        if cfg.resume:
            raise TcacheError(f"--resume: --out {out} holds no interrupted build; run without --resume")
        return out
    if k in ("build", "other"):  # an interrupted build: no valid result to protect
        if cfg.resume:
            return out
        if cfg.overwrite:
            outdir.remove_ours(out, "cache")
            return out
        raise TcacheError(f"--out {out} holds an interrupted build; pass --resume (with the same options) to "
                          "continue it, or --overwrite to start over")
    # k == "cache"
    if not cfg.overwrite:
        if cfg.resume:
            raise TcacheError(f"--resume: --out {out} is a complete cache, nothing to resume; "
                              "pass --overwrite to rebuild it")
        raise TcacheError(f"--out {out} is a tcache cache; pass --overwrite to replace it or choose another --out")
    if cfg.resume:
        stage = outdir.staging(out)
        if outdir.kind(stage) not in ("build", "other"):
            raise TcacheError(f"--resume --overwrite: no interrupted replacement of {out} to resume (looked for "
                              f"{stage}); run without --resume")
        outdir.refuse_foreign(stage, "cache", flag="staging directory")
        return stage
    return outdir.fresh_staging(out, "cache")


def _teacher_fingerprint(name: str) -> str | None:
    """A local teacher directory's config and file sizes (cheap: weights are not read); None for hub ids,
    whose revision identifies them."""
    p = Path(name).expanduser()
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}\n".encode())
            if f.name == "config.json":
                h.update(f.read_bytes())
    return h.hexdigest()


def _data_fingerprint(cfg: BuildConfig) -> list | None:
    """Local data files and their sizes (hub datasets are named by their spec)."""
    p = Path(cfg.data.path).expanduser()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    return [[str(f), f.stat().st_size] for f in files] or None


def build_identity(cfg: BuildConfig, ts: "TeacherSetup") -> dict:
    """Everything that determines a cache's bytes: a resumed build must match it exactly."""
    return {
        "teacher": cfg.teacher, "revision": cfg.revision or getattr(ts.config, "_commit_hash", None),
        "teacher_files": _teacher_fingerprint(cfg.teacher), "tokenizer_sha256": tokenizer_sha256(ts.tokenizer),
        "data": cfg.data.describe(), "data_files": _data_fingerprint(cfg), "tokens": cfg.tokens,
        "seq_len": cfg.seq_len, "top_k": cfg.top_k, "hidden_groups": cfg.hidden_groups,
        "hidden_dtype": cfg.hidden_dtype, "logprob_dtype": cfg.logprob_dtype, "rows_per_shard": cfg.rows_per_shard,
        "dtype": str(ts.dtype).removeprefix("torch."), "device_type": ts.device.type,
        "schema_version": schema.SCHEMA_VERSION,
    }


def _resume_state(cfg: BuildConfig, work: Path, identity: dict) -> BuildState:
    state = BuildState.load(work)
    diffs = [k for k in sorted(set(identity) | set(state.identity)) if identity.get(k) != state.identity.get(k)]
    if diffs:
        shown = ", ".join(f"{k} ({state.identity.get(k)!r} -> {identity.get(k)!r})" for k in diffs[:3])
        raise TcacheError(f"--resume: this build differs from the interrupted one in {shown}; rerun with the "
                          "original options, or pass --overwrite without --resume to start over")
    if cfg.batch_size and cfg.batch_size != state.batch_size:
        raise TcacheError(f"--resume: --batch-size {cfg.batch_size} differs from the interrupted build's "
                          f"{state.batch_size} (batches shape the bytes); drop --batch-size or pass {state.batch_size}")
    return state


def teacher_files_bytes(ts: "TeacherSetup") -> int:
    """embeddings.safetensors: fp32 embedding and head (V, D) each, plus the final norm (D,)."""
    return 2 * ts.vocab_size * ts.hidden_size * 4 + ts.hidden_size * 4


def bytes_needed(cfg: BuildConfig, ts: "TeacherSetup", rows: int) -> int:
    """Disk a build of `rows` more rows needs: exact field bytes, plus 2% and 1 MiB for HDF5's chunk index
    and the manifest, plus the teacher files."""
    per_row = sum(s.bytes_per_row for s in ts.specs.values())
    return int(per_row * rows * 1.02) + 2**20 + teacher_files_bytes(ts)


def check_free_space(cfg: BuildConfig, ts: "TeacherSetup", work: Path, rows: int) -> None:
    need, free = bytes_needed(cfg, ts, rows), outdir.free_bytes(work)
    # TCACHE_NO_SPACE_CHECK=1: for filesystems that misreport free space (some network mounts, quotas)
    if need > free and os.environ.get("TCACHE_NO_SPACE_CHECK") != "1":
        raise TcacheError(f"--out {cfg.out}: this build needs {fmt_bytes(need)} ({rows:,} rows of "
                          f"{cfg.seq_len} tokens and the teacher files) but its filesystem has "
                          f"{fmt_bytes(free)} free; free space, lower --tokens, or choose another --out")


def _check_against_teacher(cfg: BuildConfig, config) -> None:
    vocab_size = int(text_config(config).vocab_size)
    if cfg.top_k > vocab_size:
        raise TcacheError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary of {vocab_size}; use 1..{vocab_size}")
    max_pos = getattr(text_config(config), "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise TcacheError(
            f"--seq-len {cfg.seq_len} exceeds the teacher's max_position_embeddings {max_pos}; use at most {max_pos}"
        )


def _save_teacher_parts(model, tokenizer, config, writer: CacheWriter) -> None:
    """What the student reuses, so distillation never loads the teacher: embeddings, head, config, tokenizer."""
    from safetensors.torch import save_file

    tdir = writer.out_dir / schema.TEACHER_DIR
    config.save_pretrained(tdir)
    tokenizer.save_pretrained(tdir)
    head = model.get_output_embeddings()
    tensors = {
        # fp32 copies: exact for fp16/bf16 weights; clone() because safetensors refuses shared (tied) storage.
        "embed_tokens": model.get_input_embeddings().weight.detach().float().cpu().clone(),  # (V, D)
        "lm_head": head.weight.detach().float().cpu().clone(),  # (V, D)
    }
    if getattr(head, "bias", None) is not None:
        tensors["lm_head_bias"] = head.bias.detach().float().cpu().clone()  # (V,)
    norm = getattr(model.base_model, "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        tensors["final_norm"] = norm.weight.detach().float().cpu().clone()  # (D,)
    save_file(tensors, str(writer.add_teacher_file(schema.EMBEDDINGS_FILE)))


def auto_batch_size(device: torch.device, seq_len: int, vocab_size: int, hidden_size: int) -> int:
    """8 rows on CPU; on a GPU, as many rows (up to 64) as fit a quarter of its free memory, counting the
    bf16 logits and their fp32 chunk copies plus the fp32 hidden accumulator."""
    if device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    per_row = seq_len * (vocab_size * 2 + hidden_size * 16)
    return int(max(1, min(64, free // 4 // per_row)))


@dataclass
class TeacherSetup:
    """A checked, loaded teacher and what a build derives from it (shared by build and plan)."""

    device: torch.device
    dtype: torch.dtype
    config: object
    groups: list[tuple[int, int]]
    model: torch.nn.Module
    tokenizer: object
    vocab_size: int
    hidden_size: int
    specs: dict[str, schema.FieldSpec]


def setup_teacher(cfg: BuildConfig, before_weights: Callable[[object, torch.device], None] | None = None
                  ) -> TeacherSetup:
    """Every argument check against the teacher's config runs before its weights load;
    `before_weights(tokenizer, device)` runs between loading the tokenizer and the weights."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    config = load_config(cfg.teacher, cfg.revision)
    _check_against_teacher(cfg, config)
    groups = schema.layer_groups(num_layers(config), cfg.hidden_groups)
    tokenizer = load_tokenizer(cfg.teacher, cfg.revision)
    if before_weights is not None:
        before_weights(tokenizer, device)
    model = load_model(cfg.teacher, device, dtype, cfg.revision)
    vocab_size = int(model.get_output_embeddings().weight.shape[0])  # logits width, may pad the tokenizer's
    hidden_size = int(model.get_input_embeddings().weight.shape[1])
    specs = schema.field_specs(cfg.seq_len, hidden_size, cfg.hidden_groups, cfg.top_k, vocab_size,
                               cfg.hidden_dtype, cfg.logprob_dtype)
    return TeacherSetup(device, dtype, config, groups, model, tokenizer, vocab_size, hidden_size, specs)


def tokenizer_workers(cfg: BuildConfig, tokenizer, device: torch.device) -> int:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return 0  # a slow (Python) tokenizer cannot be shipped to the workers cheaply
    if cfg.tokenizer_workers >= 0:
        return cfg.tokenizer_workers
    return min(8, (os.cpu_count() or 2) // 2) if device.type == "cuda" else 0


def build(cfg: BuildConfig, on_progress: ProgressFn | None = None) -> Manifest:
    """Build (or resume) the cache at cfg.out. The first SIGINT / SIGTERM stops the build before its next
    batch (Interrupted), a second one at once; once anything was written, every exception carries
    `resumable` (and a note) and the state stays for --resume."""
    with stop_on_signals(graceful=True) as stop:
        # 1. setup: every check that can fail runs before anything is written
        work = work_dir(cfg)
        pools: list[TokenizerPool] = []

        def start_pool(tokenizer, device: torch.device) -> None:  # worker start-up overlaps loading the weights
            if n := tokenizer_workers(cfg, tokenizer, device):
                pools.append(TokenizerPool(tokenizer, n))

        try:
            ts = setup_teacher(cfg, before_weights=start_pool)
            if stop.requested:
                raise Interrupted(stop.signum, "nothing was written")
            manifest = _build(cfg, work, ts, pools[0] if pools else None, on_progress, stop)
        finally:
            for p in pools:
                p.close()
        if work != Path(cfg.out):
            outdir.swap_in(work, Path(cfg.out), "cache")
        return manifest


def _build(cfg: BuildConfig, work: Path, ts: TeacherSetup, pool: TokenizerPool | None,
           on_progress: ProgressFn | None, stop) -> Manifest:
    device, dtype, config, groups, model, tokenizer = ts.device, ts.dtype, ts.config, ts.groups, ts.model, ts.tokenizer
    vocab_size, hidden_size, specs = ts.vocab_size, ts.hidden_size, ts.specs
    identity = build_identity(cfg, ts)
    state = _resume_state(cfg, work, identity) if cfg.resume else None
    batch_size = state.batch_size if state else cfg.batch_size or auto_batch_size(device, cfg.seq_len, vocab_size,
                                                                                  hidden_size)
    rows_done = sum(s["rows"] for s in state.shards) if state else 0
    check_free_space(cfg, ts, work, max(cfg.rows - rows_done, 0))
    # A resumed build re-reads and re-tokenises the rows before its first missing one (cheap next to the
    # teacher) and restarts at a batch boundary of the original build, so every batch is the same.
    start = rows_done // batch_size * batch_size
    rows = pack_rows(iter_texts(cfg.data), tokenizer, cfg.seq_len, tokenizer.eos_token_id, pool=pool)
    first = next(rows, None)  # surfaces dataset / text-field errors before the output directory is touched
    if first is None:
        raise TcacheError(f"--data {cfg.data.path} holds fewer than {cfg.seq_len} tokens; nothing to cache")
    rows = itertools.islice(itertools.chain([first], rows), start, cfg.rows)

    manifest = Manifest(
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
        dataset=cfg.data.describe(),
        vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers(config), seq_len=cfg.seq_len,
        top_k=cfg.top_k, hidden_groups=cfg.hidden_groups, layer_groups=groups,
        rows_per_shard=cfg.rows_per_shard, tokens_requested=cfg.tokens,
        fields=fields_record(specs),
    )

    # 2. fit: rows are tokenised ahead in a thread, the teacher runs, shards are written behind it
    teacher = TeacherPass(model, groups, cfg.top_k)
    t0 = time.perf_counter()
    writer = CacheWriter(work, manifest, state or BuildState(identity, batch_size))
    try:
        with writer:
            done = writer.rows_done * cfg.seq_len
            skip = writer.rows_done - start  # rows of the first batch that complete shards already hold
            _save_teacher_parts(model, tokenizer, config, writer)
            # deep enough to hold a whole tokenizer call's rows, so the next call overlaps the teacher
            batches = Prefetcher(batched_rows(rows, batch_size),
                                 depth=max(4, 1_000_000 // (batch_size * cfg.seq_len)))
            sink = AsyncWriter(writer.add)
            try:
                for ids_np in batches:
                    if stop.requested:  # between batches: the writer keeps every complete shard
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
                    done += ids.numel() - skip * cfg.seq_len
                    skip = 0
                    if on_progress:
                        on_progress(done, cfg.rows * cfg.seq_len, writer.bytes_written)
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
            manifest.data_exhausted = manifest.rows < cfg.rows
            manifest.build = {
                "tcache_version": tcache.__version__,
                "torch_version": torch.__version__,
                "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
                "dtype": str(dtype).removeprefix("torch."),
                "batch_size": batch_size,
                "tokenizer_workers": pool.workers if pool is not None else 0,
                "hooked_hidden": teacher.hooked,
                "resumed_at_row": rows_done if state else None,
                # where the loop waited: for tokenised rows, for the writer; and how busy the writer was
                "waited_for_rows_s": round(batches.wait_s, 3),
                "waited_for_writer_s": round(sink.put_wait_s, 3),
                "writer_busy_s": round(sink.busy_s, 3),
                "seconds": round(seconds, 3),
                "tokens_per_s": round((done - rows_done * cfg.seq_len) / seconds, 1) if seconds > 0 else None,
            }
    except OSError as e:
        if not is_disk_full(e):
            raise _resumable(e, writer)
        raise _resumable(writer.disk_full_error(), writer) from None
    except (TcacheError, Interrupted, Exception) as e:
        raise _resumable(e, writer)
    return manifest


def _resumable(e: BaseException, writer: CacheWriter) -> BaseException:
    """Mark an exception that escaped after the build state was written: the same command with --resume
    continues from the last complete shard."""
    if (writer.out_dir / outdir.BUILD_STATE).exists():
        e.resumable = True
        if not isinstance(e, (TcacheError, Interrupted)):
            e.add_note(f"{len(writer.manifest.shards)} complete shard(s) are kept in {writer.out_dir}; "
                       "rerun the same command with --resume to continue")
    return e
