"""The on-disk format of a teacher cache: the one place that names files, datasets, dtypes and chunks.

A cache is a directory:

    manifest.json              written last; the truth about everything below
    shard-00000.h5 ...         HDF5 shards of `rows_per_shard` packed rows each (the last may be shorter)
    teacher/config.json        the teacher's HF config
    teacher/tokenizer*.json    the teacher's tokenizer files
    teacher/embeddings.safetensors
                               embed_tokens (V, D), lm_head (V, D) [, lm_head_bias (V,)] [, final_norm (D,)]

Each shard holds, for `rows` packed rows of `seq_len` tokens:

    input_ids      (rows, seq_len)            uint16 if vocab <= 65536 else int32
    hidden         (rows, seq_len, D)         float16, when hidden_groups == 1
                   (rows, seq_len, G, D)      float16, when hidden_groups == G > 1
                   absent                     when hidden_groups == 0 (a KD-only cache)
    topk_logprobs  (rows, seq_len, k)         float32, log-softmax over the FULL vocabulary at T=1,
                                              sorted descending along k
    topk_ids       (rows, seq_len, k)         same dtype as input_ids

Every dataset is chunked as (1, *row_shape): one row is one chunk, so reading a row is one read.
Bump SCHEMA_VERSION whenever any of the above changes meaning.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from teachercache.errors import TcacheError

SCHEMA_VERSION = 1
FORMAT_NAME = "tcache"

MANIFEST_FILE = "manifest.json"
TEACHER_DIR = "teacher"
EMBEDDINGS_FILE = f"{TEACHER_DIR}/embeddings.safetensors"
PARTIAL_SUFFIX = ".partial"

INPUT_IDS = "input_ids"
HIDDEN = "hidden"
TOPK_LOGPROBS = "topk_logprobs"
TOPK_IDS = "topk_ids"
FIELDS = (INPUT_IDS, HIDDEN, TOPK_LOGPROBS, TOPK_IDS)

HIDDEN_DTYPE = "float16"
LOGPROB_DTYPE = "float32"

# What `hidden` averages, stated once so docs, manifest and code agree.
HIDDEN_SOURCE = (
    "mean over the teacher's L transformer-layer outputs, i.e. transformers' "
    "outputs.hidden_states[1:] (output_hidden_states=True; index 0, the embedding output, is "
    "excluded). For Llama-family models transformers returns the final entry AFTER the final "
    "RMSNorm, so the average covers the residual stream after layers 1..L-1 and the normed "
    "output of layer L. With hidden_groups G > 1, group g averages the contiguous slice "
    "hidden_states[1:][start_g:end_g] listed in layer_groups."
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def token_dtype(vocab_size: int) -> str:
    """Smallest integer dtype that holds every token id of the vocabulary."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """Split layers 0..L-1 (indices into hidden_states[1:]) into `groups` contiguous slices.

    Sizes differ by at most one, larger groups first (numpy.array_split's rule).
    """
    if groups == 0:
        return []
    if not 0 <= groups <= num_layers:
        raise TcacheError(
            f"--hidden-groups {groups} does not fit a teacher with {num_layers} layers; "
            f"use a value from 0 (no hidden states) to {num_layers}"
        )
    splits = np.array_split(np.arange(num_layers), groups)
    return [(int(s[0]), int(s[-1]) + 1) for s in splits]


@dataclass(frozen=True)
class FieldSpec:
    dtype: str
    row_shape: tuple[int, ...]

    @property
    def chunks(self) -> tuple[int, ...]:
        return (1, *self.row_shape)

    @property
    def bytes_per_row(self) -> int:
        return int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize


def field_specs(seq_len: int, hidden_size: int, hidden_groups: int, top_k: int,
                vocab_size: int) -> dict[str, FieldSpec]:
    """The datasets of a shard; hidden_groups == 0 stores no hidden states (a KD-only cache)."""
    ids = token_dtype(vocab_size)
    specs = {INPUT_IDS: FieldSpec(ids, (seq_len,))}
    if hidden_groups > 0:
        hidden_shape = (seq_len, hidden_size) if hidden_groups == 1 else (seq_len, hidden_groups, hidden_size)
        specs[HIDDEN] = FieldSpec(HIDDEN_DTYPE, hidden_shape)
    specs[TOPK_LOGPROBS] = FieldSpec(LOGPROB_DTYPE, (seq_len, top_k))
    specs[TOPK_IDS] = FieldSpec(ids, (seq_len, top_k))
    return specs


@dataclass
class ShardInfo:
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """Everything a reader needs to trust and interpret a cache. Serialised as manifest.json."""

    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    dataset: dict[str, Any]
    vocab_size: int
    hidden_size: int
    num_layers: int
    seq_len: int
    top_k: int
    hidden_groups: int
    layer_groups: list[tuple[int, int]]
    rows_per_shard: int
    tokens_requested: int
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    teacher_files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    tokens: int = 0
    rows: int = 0
    data_exhausted: bool = False
    build: dict[str, Any] = field(default_factory=dict)
    hidden_source: str = HIDDEN_SOURCE
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT_NAME

    def field_specs(self) -> dict[str, FieldSpec]:
        return {name: FieldSpec(f["dtype"], tuple(f["row_shape"])) for name, f in self.fields.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        d["layer_groups"] = [tuple(g) for g in d["layer_groups"]]
        return cls(**d)


def load_manifest(cache_dir: str | os.PathLike) -> Manifest:
    """Read and validate manifest.json; every failure is a one-line TcacheError that says what to do."""
    path = Path(cache_dir)
    if not path.is_dir():
        raise TcacheError(f"{path} is not a directory; pass the --out directory of a `tcache build`")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise TcacheError(
            f"{path} is not a tcache cache (no {MANIFEST_FILE}; an interrupted build leaves none); "
            "run `tcache build` to create one"
        )
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TcacheError(f"{mpath} is not valid JSON ({e.msg}); rebuild the cache with `tcache build`") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise TcacheError(f"{mpath} is not a tcache manifest; point at a directory made by `tcache build`")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise TcacheError(
            f"{path} has cache schema version {version}, this tcache reads version {SCHEMA_VERSION}; "
            "rebuild the cache with this version's `tcache build` (or install the tcache that wrote it)"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (TypeError, KeyError) as e:
        raise TcacheError(f"{mpath} is incomplete or corrupt ({e}); rebuild the cache with `tcache build`") from None
    for shard in manifest.shards:
        spath = path / shard.file
        if not spath.is_file():
            raise TcacheError(f"{path}: shard {shard.file} listed in the manifest is missing; rebuild the cache")
        if spath.stat().st_size != shard.bytes:
            raise TcacheError(
                f"{path}: shard {shard.file} has {spath.stat().st_size} bytes, the manifest says {shard.bytes}; "
                "the cache was modified or truncated, rebuild it"
            )
    return manifest


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
