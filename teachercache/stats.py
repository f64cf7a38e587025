"""What a cache holds: sizes, teacher, and the distribution of what was cached."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from tcache.teachercache import schema
from tcache.teachercache.codecs import decode_hidden
from tcache.errors import TcacheError
from tcache.teachercache.reader import CacheReader

PERCENTILES = (1, 5, 50, 95, 99)
HIDDEN_VALUES_PER_ROW = 4096


def _sample_rows(n_rows: int, max_rows: int) -> np.ndarray:
    """Evenly spaced rows, so stats of a huge cache stay cheap and cover every shard."""
    if n_rows <= max_rows:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, max_rows).round().astype(int))


def sample_values(reader: CacheReader, rows: np.ndarray, keep_hidden: bool = False) -> dict[str, np.ndarray]:
    """What the sampled rows hold, per token: the top-k probability mass (N,) and each hidden group's RMS
    over its D values (G, N); with keep_hidden, also HIDDEN_VALUES_PER_ROW of each row's hidden values per
    group (G, M), a fixed-size sample for a histogram that costs the same whatever D and --sample-rows are."""
    m = reader.manifest
    pick = np.random.default_rng(0)
    mass, token_rms, kept = [], [], []
    for r in rows:
        row = reader.row(int(r))
        lp = row[schema.TOPK_LOGPROBS].astype(np.float64)  # (T, k)
        mass.append(np.exp(lp).sum(-1))  # (T,)
        if schema.HIDDEN in row:
            h = decode_hidden(row, m.fields[schema.HIDDEN]["dtype"]).astype(np.float64)
            h = h.reshape(m.seq_len, m.hidden_groups, m.hidden_size).transpose(1, 0, 2)  # (G, T, D)
            token_rms.append(np.sqrt((h**2).mean(-1)))  # (G, T)
            if keep_hidden:
                flat = h.reshape(m.hidden_groups, -1)
                take = pick.choice(flat.shape[1], min(HIDDEN_VALUES_PER_ROW, flat.shape[1]), replace=False)
                kept.append(flat[:, take].astype(np.float32))
    groups = m.hidden_groups
    return {
        "topk_mass": np.concatenate(mass) if mass else np.zeros(0),
        "token_rms": np.concatenate(token_rms, axis=1) if token_rms else np.zeros((groups, 0)),
        "hidden_values": np.concatenate(kept, axis=1) if kept else np.zeros((groups, 0), np.float32),
    }


def cache_stats(cache_dir: str | os.PathLike, max_rows: int = 256, keep_samples: bool = False) -> dict:
    """The cache's sizes, provenance and value statistics over `max_rows` evenly spaced rows; with
    keep_samples, the sampled values themselves under "samples" (sample_values; for `stats --plot`)."""
    if max_rows < 1:  # 0 rows would report statistics of nothing (a hidden RMS of 0.0000)
        raise TcacheError(f"--sample-rows must be at least 1, got {max_rows}; the statistics need rows to read")
    reader = CacheReader(cache_dir)
    m = reader.manifest
    root = Path(cache_dir)
    tokens = max(m.tokens, 1)

    field_bytes = {name: 0 for name in m.fields}
    for shard in m.shards:
        with h5py.File(root / shard.file, "r") as f:
            for name in m.fields:
                field_bytes[name] += f[name].id.get_storage_size()
    total_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    rows = _sample_rows(len(reader), max_rows)
    values = sample_values(reader, rows, keep_hidden=keep_samples)
    reader.close()
    mass = values["topk_mass"]
    ms = values["token_rms"] ** 2  # (G, N): each token's mean square, all tokens weigh the same (D values each)
    rms = np.sqrt(ms.mean(axis=1)) if ms.shape[1] else np.zeros(m.hidden_groups)

    return {
        "cache": str(root),
        "schema_version": m.schema_version,
        "teacher": {k: m.teacher.get(k) for k in ("name_or_path", "revision", "model_type")},
        "tokenizer_sha256": m.tokenizer["sha256"],
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_layers": m.num_layers,
        "tokens": m.tokens,
        "tokens_requested": m.tokens_requested,
        "data_exhausted": m.data_exhausted,
        "rows": m.rows,
        "shards": len(m.shards),
        "seq_len": m.seq_len,
        "top_k": m.top_k,
        "hidden_groups": m.hidden_groups,
        "layer_groups": [list(g) for g in m.layer_groups],
        "hidden_source": m.hidden_source,
        "bytes_total": total_bytes,
        "fields": {
            name: {"dtype": m.fields[name]["dtype"], "bytes": b, "bytes_per_token": b / tokens}
            for name, b in field_bytes.items()
        },
        "bytes_per_token": sum(field_bytes.values()) / tokens,
        "topk_mass": {
            "rows_sampled": int(len(rows)),
            "mean": float(mass.mean()) if mass.size else None,
            **{f"p{p}": float(np.percentile(mass, p)) if mass.size else None for p in PERCENTILES},
        },
        "hidden_rms": [float(x) for x in rms],
        "dataset": m.dataset,
        "build": m.build,
        **({"samples": values} if keep_samples else {}),
    }
