"""The build loop: setup (teacher, data, output) -> run the teacher over the budget -> manifest."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import teachercache
from teachercache import schema
from teachercache.data import DataSpec, TokenizerPool, iter_texts, pack_rows
from teachercache.errors import TcacheError
from teachercache.pipeline import AsyncWriter, Prefetcher, batched_rows
from teachercache.schema import Manifest
from teachercache.teacher import (TeacherPass, load_config, load_model, load_tokenizer, num_layers, resolve_device,
                                  resolve_dtype, text_config, tokenizer_sha256)
from teachercache.writer import CacheWriter

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(text: str | int, flag: str = "--tokens") -> int:
    """'512M' -> 512_000_000, '2.5k' -> 2500, '100000' -> 100000 (decimal units, as token budgets are quoted)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", str(text).replace("_", ""))
        if not m:
            raise TcacheError(f"{flag} {text!r} is not a count; write e.g. 100000, 2.5k, 512M or 1B")
        value = int(round(float(m.group(1)) * _SUFFIX[m.group(2).lower()]))
    if value <= 0:
        raise TcacheError(f"{flag} must be positive, got {text!r}")
    return value


@dataclass
class BuildConfig:
    teacher: str
    """Hub id or local directory of a HF causal LM (--teacher)."""
    data: DataSpec
    """Where the text comes from (--data, --data-config, --split, --text-field)."""
    out: str
    """Cache directory to create (--out)."""
    tokens: int
    """Token budget; rounded down to whole rows of seq_len (--tokens)."""
    seq_len: int = 512
    """Tokens per packed row (--seq-len)."""
    top_k: int = 64
    """Teacher log-probs kept per position (--top-k)."""
    hidden_groups: int = 1
    """Contiguous teacher-layer groups to average separately, 0 for none; storage grows linearly (--hidden-groups)."""
    hidden_dtype: str = schema.DEFAULT_HIDDEN_DTYPE
    """Stored hidden dtype: nf4 (4-bit NormalFloat, per 32-value block), int8 (absmax-scaled per position), fp16, bf16 (--hidden-dtype)."""
    logprob_dtype: str = schema.DEFAULT_LOGPROB_DTYPE
    """Stored top-k log-prob dtype: fp16, fp32 (--logprob-dtype)."""
    batch_size: int = 0
    """Rows per teacher forward; 0 = automatic: 8 on CPU, on a GPU up to 64 as its free memory allows (--batch-size)."""
    rows_per_shard: int = 1024
    """Rows per HDF5 shard (--shard-rows)."""
    tokenizer_workers: int = -1
    """Processes that tokenise ahead of the teacher; 0 tokenises in a thread of the build; -1 = automatic:
    min(8, cores / 2) with a GPU teacher, 0 on CPU, where the teacher needs the cores (--tokenizer-workers)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N (--device)."""
    dtype: str = "auto"
    """Teacher compute dtype: auto (bf16 on GPU, fp16 without bf16, fp32 on CPU), bf16, fp16, fp32 (--dtype)."""
    revision: str | None = None
    """Hub revision of the teacher (--revision)."""
    overwrite: bool = False
    """Replace an existing non-empty --out (--overwrite)."""

    def __post_init__(self) -> None:
        if self.hidden_groups < 0:
            raise TcacheError(f"--hidden-groups must be 0 (no hidden states) or more, got {self.hidden_groups}")
        if self.tokenizer_workers < -1:
            raise TcacheError(f"--tokenizer-workers must be -1 (automatic), 0 (a thread) or more, got {self.tokenizer_workers}")
        if self.batch_size < 0:
            raise TcacheError(f"--batch-size must be 0 (automatic) or more, got {self.batch_size}")
        for flag, value in (("--seq-len", self.seq_len), ("--top-k", self.top_k),
                            ("--shard-rows", self.rows_per_shard), ("--tokens", self.tokens)):
            if value < 1:
                raise TcacheError(f"{flag} must be at least 1, got {value}")
        schema.field_specs(1, 1, 0, 1, 1, self.hidden_dtype, self.logprob_dtype)  # validates both names
        if self.tokens < self.seq_len:
            raise TcacheError(
                f"--tokens {self.tokens} is less than one row of --seq-len {self.seq_len}; raise --tokens"
            )

    @property
    def rows(self) -> int:
        return self.tokens // self.seq_len


ProgressFn = Callable[[int, int, int], None]  # (tokens_done, tokens_budget, bytes_written)


def _check_out_dir(cfg: BuildConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TcacheError(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise TcacheError(f"--out {out} is not empty; pass --overwrite to replace it or choose another --out")
    return out


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
    # 1. setup: every check that can fail runs before anything is written
    out = _check_out_dir(cfg)
    pools: list[TokenizerPool] = []

    def start_pool(tokenizer, device: torch.device) -> None:  # worker start-up overlaps loading the weights
        if n := tokenizer_workers(cfg, tokenizer, device):
            pools.append(TokenizerPool(tokenizer, n))

    try:
        ts = setup_teacher(cfg, before_weights=start_pool)
        return _build(cfg, out, ts, pools[0] if pools else None, on_progress)
    finally:
        for p in pools:
            p.close()


def _build(cfg: BuildConfig, out: Path, ts: TeacherSetup, pool: TokenizerPool | None,
           on_progress: ProgressFn | None) -> Manifest:
    device, dtype, config, groups, model, tokenizer = ts.device, ts.dtype, ts.config, ts.groups, ts.model, ts.tokenizer
    vocab_size, hidden_size, specs = ts.vocab_size, ts.hidden_size, ts.specs
    rows = pack_rows(iter_texts(cfg.data), tokenizer, cfg.seq_len, tokenizer.eos_token_id, pool=pool)
    first = next(rows, None)  # surfaces dataset / text-field errors before the output directory is touched
    if first is None:
        raise TcacheError(f"--data {cfg.data.path} holds fewer than {cfg.seq_len} tokens; nothing to cache")
    rows = itertools.islice(itertools.chain([first], rows), cfg.rows)

    if out.is_dir() and cfg.overwrite:
        shutil.rmtree(out)
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
        fields=schema.fields_record(specs),
    )

    # 2. fit: rows are tokenised ahead in a thread, the teacher runs, shards are written behind it
    batch_size = cfg.batch_size or auto_batch_size(device, cfg.seq_len, vocab_size, hidden_size)
    teacher = TeacherPass(model, groups, cfg.top_k)
    t0 = time.perf_counter()
    done = 0
    with CacheWriter(out, manifest) as writer:
        _save_teacher_parts(model, tokenizer, config, writer)
        # deep enough to hold a whole tokenizer call's rows, so the next call overlaps the teacher
        batches = Prefetcher(batched_rows(rows, batch_size), depth=max(4, 1_000_000 // (batch_size * cfg.seq_len)))
        sink = AsyncWriter(writer.add)
        try:
            for ids_np in batches:
                ids = torch.from_numpy(ids_np)  # (B, T) int32
                if device.type == "cuda":  # pinned + non_blocking: no wait for the GPU to drain
                    ids = ids.pin_memory().to(device, non_blocking=True)
                ids = ids.to(device=device, dtype=torch.long)
                tgt = teacher(ids)
                sink.put(schema.encode_fields(ids, tgt.hidden, tgt.topk_logprobs, tgt.topk_ids, specs))
                done += ids.numel()
                if on_progress:
                    on_progress(done, cfg.rows * cfg.seq_len, writer.bytes_written)
        except BaseException:
            sink.close(raise_error=False)  # the writer thread must be idle before the cache is removed
            raise
        finally:
            batches.close()
            teacher.close()
        sink.close()
        writer.finish()
        seconds = time.perf_counter() - t0
        # 3. the manifest is written when the `with` block closes: last, and only on success
        manifest.data_exhausted = done < cfg.rows * cfg.seq_len
        manifest.build = {
            "tcache_version": teachercache.__version__,
            "torch_version": torch.__version__,
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "dtype": str(dtype).removeprefix("torch."),
            "batch_size": batch_size,
            "tokenizer_workers": pool.workers if pool is not None else 0,
            "hooked_hidden": teacher.hooked,
            # where the loop waited: for tokenised rows, for the writer; and how busy the writer was
            "waited_for_rows_s": round(batches.wait_s, 3),
            "waited_for_writer_s": round(sink.put_wait_s, 3),
            "writer_busy_s": round(sink.busy_s, 3),
            "seconds": round(seconds, 3),
            "tokens_per_s": round(done / seconds, 1) if seconds > 0 else None,
        }
    return manifest
