"""`tcache plan`: what a build will take, before running it: exact bytes, and a time from a short measured run."""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import torch

from tcache.teachercache import schema
from tcache import outdir
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.setup import auto_batch_size, setup_teacher
from tcache.teachercache.space import bytes_needed, teacher_files_bytes
from tcache.text import iter_texts, pack_rows
from tcache.errors import TcacheError
from tcache.teachercache.pipeline import batched_rows
from tcache.teachercache.codecs import encode_fields
from tcache.teachercache.manifest import Manifest, fields_record
from tcache.teachercache.teacher import TeacherPass
from tcache.teachercache.writer import BuildState, CacheWriter


def plan(cfg: BuildConfig, measure_batches: int = 3) -> dict:
    ts = setup_teacher(cfg)
    device, dtype, groups, model, tokenizer = ts.device, ts.dtype, ts.groups, ts.model, ts.tokenizer
    V, D, specs = ts.vocab_size, ts.hidden_size, ts.specs
    per_token = {name: s.bytes_per_row / cfg.seq_len for name, s in specs.items()}
    tokens = cfg.rows * cfg.seq_len
    teacher_bytes = teacher_files_bytes(ts)

    # A short measured run: the teacher pass on real rows, then writing those rows to a shard on --out's disk.
    batch_size = cfg.batch_size or auto_batch_size(device, cfg.seq_len, V, D)
    rows = itertools.islice(pack_rows(iter_texts(cfg.data), tokenizer, cfg.seq_len, tokenizer.eos_token_id),
                            batch_size * (measure_batches + 1))
    batches = list(batched_rows(rows, batch_size))
    if not batches:
        raise TcacheError(f"--data {cfg.data.path} holds fewer than {cfg.seq_len} tokens; nothing to plan")
    tp = TeacherPass(model, groups, cfg.top_k)
    encoded = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, b in enumerate(batches):
        if i == 1:  # the first batch warms up (allocations, kernels)
            sync()
            t0 = time.perf_counter()
        ids = torch.from_numpy(b).to(device)
        tgt = tp(ids)
        fields = encode_fields(ids, tgt.hidden, tgt.topk_logprobs, tgt.topk_ids, specs)
        encoded.append({k: v.cpu().numpy() for k, v in fields.items()})
    sync()
    timed = batches[1:] or batches
    teacher_tok_s = sum(b.size for b in timed) / max(time.perf_counter() - t0, 1e-9) if len(batches) > 1 else None
    tp.close()

    parent = Path(cfg.out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".tcache-plan-") as tmp:
        manifest = Manifest(teacher={}, tokenizer={}, dataset={}, vocab_size=V, hidden_size=D, num_layers=0,
                            seq_len=cfg.seq_len, top_k=cfg.top_k, hidden_groups=cfg.hidden_groups,
                            layer_groups=groups, rows_per_shard=sum(len(e[schema.INPUT_IDS]) for e in encoded),
                            tokens_requested=0,
                            fields=fields_record(specs))
        t = time.perf_counter()
        with CacheWriter(Path(tmp) / "c", manifest, BuildState({}, batch_size)) as w:
            for e in encoded:
                w.add(e)
        write_s = time.perf_counter() - t
        written = sum(len(e[schema.INPUT_IDS]) for e in encoded) * cfg.seq_len * sum(per_token.values())
    disk_bytes_s = written / max(write_s, 1e-9)
    bytes_per_token = sum(per_token.values())
    disk_tok_s = disk_bytes_s / bytes_per_token
    # The build overlaps the teacher and the writes: the slower one sets the pace.
    rate = min(teacher_tok_s or disk_tok_s, disk_tok_s)
    need, free = bytes_needed(cfg, ts, cfg.rows), outdir.free_bytes(Path(cfg.out))
    return {
        "disk_needed_bytes": need, "disk_free_bytes": free, "fits": need <= free,
        "teacher": cfg.teacher, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens, "rows": cfg.rows, "seq_len": cfg.seq_len, "top_k": cfg.top_k,
        "hidden_groups": cfg.hidden_groups, "batch_size": batch_size,
        "fields": {n: {"dtype": specs[n].dtype, "bytes_per_token": b} for n, b in per_token.items()},
        "bytes_per_token": bytes_per_token,
        "shard_bytes": int(bytes_per_token * tokens), "teacher_files_bytes": teacher_bytes,
        "total_bytes": int(bytes_per_token * tokens) + teacher_bytes,
        "measured": {"teacher_tokens_per_s": teacher_tok_s, "disk_bytes_per_s": disk_bytes_s,
                     "disk_tokens_per_s": disk_tok_s, "tokens": int(sum(b.size for b in batches))},
        "estimated_seconds": tokens / rate, "bound_by": "disk" if disk_tok_s < (teacher_tok_s or 1e30) else "teacher",
    }
