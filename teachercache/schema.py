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
    hidden         (rows, seq_len, D)         when hidden_groups == 1; --hidden-dtype: nf4 (default,
                   (rows, seq_len, G, D)      when hidden_groups == G > 1;  uint8, D/2 per position),
                   absent                     when hidden_groups == 0       int8, float16, or bfloat16
                                                                            (stored as its uint16 bits)
    hidden_scale   (rows, seq_len[, G])       float16, int8 hidden: value = int8 * scale, with
                                              scale = absmax over D / 127 (per position and group)
                   (rows, seq_len[, G], D/32) float16, nf4 hidden: one scale per block of 32 values,
                                              scale = block absmax, value = NF4_LEVELS[code] * scale,
                                              two 4-bit codes a byte (even index = low nibble)
    topk_logprobs  (rows, seq_len, k)         float16 (default) or float32 (--logprob-dtype):
                                              log-softmax over the FULL vocabulary at T=1, sorted descending
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
from typing import TYPE_CHECKING, Any

import numpy as np

from tcache.errors import TcacheError

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 3
# Version 1 (float16 hidden, float32 log-probs only) and 2 (adds int8 / bfloat16 hidden, float16
# log-probs, uint16 ids) are subsets of version 3 (adds nf4 hidden): still readable.
READABLE_VERSIONS = (1, 2, 3)
FORMAT_NAME = "tcache"

MANIFEST_FILE = "manifest.json"
TEACHER_DIR = "teacher"
EMBEDDINGS_FILE = f"{TEACHER_DIR}/embeddings.safetensors"
PARTIAL_SUFFIX = ".partial"

INPUT_IDS = "input_ids"
HIDDEN = "hidden"
HIDDEN_SCALE = "hidden_scale"
TOPK_LOGPROBS = "topk_logprobs"
TOPK_IDS = "topk_ids"
FIELDS = (INPUT_IDS, HIDDEN, HIDDEN_SCALE, TOPK_LOGPROBS, TOPK_IDS)

# CLI name -> logical dtype recorded in the manifest. Defaults chosen by measurement (docs/format.md).
HIDDEN_DTYPES = {"nf4": "nf4", "int8": "int8", "fp16": "float16", "bf16": "bfloat16"}
LOGPROB_DTYPES = {"fp16": "float16", "fp32": "float32"}
DEFAULT_HIDDEN_DTYPE = "nf4"
# nf4: QLoRA's 4-bit NormalFloat levels (Dettmers et al. 2023, as in bitsandbytes), blocks of 32 values
# sharing one fp16 absmax (4.5 bits a value). Chosen over uniform int4 by measurement: teacher hidden
# states are heavy-tailed (absmax ~40x the RMS), and levels dense near zero halve the alignment error
# (benchmarks/field_error.py).
NF4_BLOCK = 32
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)
DEFAULT_LOGPROB_DTYPE = "fp16"
# HDF5 has no bfloat16: it is stored as its bit pattern.
_STORAGE = {"bfloat16": "uint16", "nf4": "uint8"}

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
    if not 1 <= groups <= num_layers:
        raise TcacheError(
            f"--hidden-groups {groups} does not fit a teacher with {num_layers} layers; "
            f"use a value from 0 (no hidden states) to {num_layers}"
        )
    splits = np.array_split(np.arange(num_layers), groups)
    return [(int(s[0]), int(s[-1]) + 1) for s in splits]


@dataclass(frozen=True)
class FieldSpec:
    dtype: str
    """Logical dtype, as recorded in the manifest (e.g. bfloat16)."""
    row_shape: tuple[int, ...]

    @property
    def storage_dtype(self) -> str:
        """The numpy / HDF5 dtype the values are stored as."""
        return _STORAGE.get(self.dtype, self.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        return (1, *self.row_shape)

    @property
    def bytes_per_row(self) -> int:
        return int(np.prod(self.row_shape)) * np.dtype(self.storage_dtype).itemsize


def field_specs(seq_len: int, hidden_size: int, hidden_groups: int, top_k: int, vocab_size: int,
                hidden_dtype: str = DEFAULT_HIDDEN_DTYPE, logprob_dtype: str = DEFAULT_LOGPROB_DTYPE,
                ) -> dict[str, FieldSpec]:
    """The datasets of a shard; hidden_groups == 0 stores no hidden states (a KD-only cache)."""
    if hidden_dtype not in HIDDEN_DTYPES:
        raise TcacheError(f"--hidden-dtype {hidden_dtype!r} is unknown; use one of {', '.join(HIDDEN_DTYPES)}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise TcacheError(f"--logprob-dtype {logprob_dtype!r} is unknown; use one of {', '.join(LOGPROB_DTYPES)}")
    ids = token_dtype(vocab_size)
    specs = {INPUT_IDS: FieldSpec(ids, (seq_len,))}
    if hidden_groups > 0:
        group = () if hidden_groups == 1 else (hidden_groups,)
        if hidden_dtype == "nf4":
            if hidden_size % NF4_BLOCK:
                raise TcacheError(f"--hidden-dtype nf4 needs a hidden size divisible by {NF4_BLOCK} (the teacher "
                                  f"has {hidden_size}); use --hidden-dtype int8")
            specs[HIDDEN] = FieldSpec("nf4", (seq_len, *group, hidden_size // 2))
            specs[HIDDEN_SCALE] = FieldSpec("float16", (seq_len, *group, hidden_size // NF4_BLOCK))
        else:
            specs[HIDDEN] = FieldSpec(HIDDEN_DTYPES[hidden_dtype], (seq_len, *group, hidden_size))
        if hidden_dtype == "int8":
            specs[HIDDEN_SCALE] = FieldSpec("float16", (seq_len, *group))
    specs[TOPK_LOGPROBS] = FieldSpec(LOGPROB_DTYPES[logprob_dtype], (seq_len, top_k))
    specs[TOPK_IDS] = FieldSpec(ids, (seq_len, top_k))
    return specs


def fields_record(specs: dict[str, FieldSpec]) -> dict[str, dict[str, Any]]:
    """The manifest's `fields` entry for these specs (Manifest.field_specs reads it back)."""
    return {name: {"dtype": s.dtype, "row_shape": list(s.row_shape)} for name, s in specs.items()}


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
    if version not in READABLE_VERSIONS:
        raise TcacheError(
            f"{path} has cache schema version {version}, this tcache reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; "
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


_NF4_MIDPOINTS: dict = {}


def _nf4_midpoints(device) -> "torch.Tensor":
    """Decision boundaries between NF4 levels, kept per device: a host-to-device copy per batch would
    make the build wait for the GPU to drain."""
    import torch

    if device not in _NF4_MIDPOINTS:
        _NF4_MIDPOINTS[device] = torch.from_numpy((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).to(device)
    return _NF4_MIDPOINTS[device]


def encode_hidden(hidden: "torch.Tensor", dtype: str) -> dict[str, "torch.Tensor"]:
    """fp32 hidden means (B, T, G, D) -> the tensors to store (on the same device), G squeezed when 1.

    int8: per position and group, scale = absmax / 127 rounded to fp16, values round(h / scale).
    nf4: per block of 32 values, scale = absmax (fp16), code = nearest NF4 level of h / scale, two a byte.
    bfloat16 comes back as its int16 bit pattern (stored as uint16)."""
    import torch

    if dtype == "nf4":
        B, T, G, D = hidden.shape
        blocks = hidden.reshape(B, T, G, D // NF4_BLOCK, NF4_BLOCK)  # (B, T, G, D/32, 32)
        scale = blocks.abs().amax(-1).to(torch.float16)  # (B, T, G, D/32)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        code = torch.bucketize(blocks / safe.unsqueeze(-1), _nf4_midpoints(hidden.device))  # nearest level, 0..15
        code = code.to(torch.uint8).reshape(B, T, G, D // 2, 2)
        out = {HIDDEN: code[..., 0] | (code[..., 1] << 4), HIDDEN_SCALE: scale}  # (B, T, G, D/2), (B, T, G, D/32)
    elif dtype == "float16":
        out = {HIDDEN: hidden.to(torch.float16)}
    elif dtype == "bfloat16":
        out = {HIDDEN: hidden.to(torch.bfloat16).view(torch.int16)}
    elif dtype == "int8":
        scale = (hidden.abs().amax(-1) / 127).to(torch.float16)  # (B, T, G)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        q = torch.round(hidden / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)  # (B, T, G, D)
        out = {HIDDEN: q, HIDDEN_SCALE: scale}
    else:
        raise ValueError(f"unknown hidden dtype {dtype}")
    return {k: v.squeeze(2) for k, v in out.items()} if hidden.shape[2] == 1 else out


def encode_fields(input_ids: "torch.Tensor", hidden: "torch.Tensor | None", topk_logprobs: "torch.Tensor",
                  topk_ids: "torch.Tensor", specs: dict[str, FieldSpec]) -> dict[str, "torch.Tensor"]:
    """One batch of teacher targets -> the tensors a shard stores, in the dtypes of `specs`. Ids are
    narrowed on the device (uint16 storage comes back as int16 with the same bits) so that copies to the
    host move no more bytes than the shard stores."""
    import torch

    def ids(t: "torch.Tensor") -> "torch.Tensor":
        t = t.to(torch.int32)
        return t.to(torch.int16) if specs[INPUT_IDS].storage_dtype == "uint16" else t  # int32 -> int16 wraps

    fields = {
        INPUT_IDS: ids(input_ids),  # (B, T)
        TOPK_LOGPROBS: topk_logprobs.to(getattr(torch, specs[TOPK_LOGPROBS].dtype)),  # (B, T, k)
        TOPK_IDS: ids(topk_ids),  # (B, T, k)
    }
    if HIDDEN in specs:
        fields.update(encode_hidden(hidden, specs[HIDDEN].dtype))  # (B, T, [G,] D)
    return fields


def decode_hidden(row: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    """Stored hidden arrays of one or more rows -> float32 values, same shape as `hidden`."""
    h = row[HIDDEN]
    if dtype == "float16":
        return h.astype(np.float32)
    if dtype == "bfloat16":
        return (h.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        return h.astype(np.float32) * row[HIDDEN_SCALE].astype(np.float32)[..., None]
    if dtype == "nf4":
        code = np.stack([h & 0x0F, h >> 4], axis=-1)  # (..., D/2, 2)
        scale = row[HIDDEN_SCALE].astype(np.float32)  # (..., D/32)
        values = NF4_LEVELS[code.reshape(*scale.shape, NF4_BLOCK)] * scale[..., None]  # (..., D/32, 32)
        return values.reshape(*h.shape[:-1], h.shape[-1] * 2)
    raise ValueError(f"unknown hidden dtype {dtype}")


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
