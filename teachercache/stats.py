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


def _sample_rows(n_rows: int, max_rows: int) -> np.ndarray:
    """Evenly spaced rows, so stats of a huge cache stay cheap and cover every shard."""
    if n_rows <= max_rows:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, max_rows).round().astype(int))


def cache_stats(cache_dir: str | os.PathLike, max_rows: int = 256) -> dict:
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
    mass, sq_sum, sq_n = [], np.zeros(m.hidden_groups), 0
    for r in rows:
        row = reader.row(int(r))
        lp = row[schema.TOPK_LOGPROBS].astype(np.float64)  # (T, k)
        mass.append(np.exp(lp).sum(-1))  # (T,)
        if schema.HIDDEN in row:
            h = decode_hidden(row, m.fields[schema.HIDDEN]["dtype"]).astype(np.float64)
            h = h.reshape(m.seq_len, m.hidden_groups, m.hidden_size)  # (T, G, D)
            sq_sum += (h**2).sum(axis=(0, 2))  # (G,)
            sq_n += m.seq_len * m.hidden_size
    reader.close()
    mass = np.concatenate(mass) if mass else np.zeros(0)
    rms = np.sqrt(sq_sum / max(sq_n, 1))

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
    }
