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

manifest.json is read and written through teachercache.manifest; how each hidden dtype is encoded and
decoded is teachercache.codecs. This module needs numpy only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcache.errors import TcacheError

SCHEMA_VERSION = 3
# Version 1 (float16 hidden, float32 log-probs only) and 2 (adds int8 / bfloat16 hidden, float16
# log-probs, uint16 ids) are subsets of version 3 (adds nf4 hidden): still readable.
READABLE_VERSIONS = (1, 2, 3)
FORMAT_NAME = "tcache"

MANIFEST_FILE = "manifest.json"
TEACHER_DIR = "teacher"
EMBEDDINGS_FILE = f"{TEACHER_DIR}/embeddings.safetensors"
TIED_HEAD_KEY = "tied_lm_head"  # embeddings.safetensors metadata: "true" when lm_head is embed_tokens (stored once)
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
    # numpy.array_split's rule in plain Python: torch.compile traces numpy calls as tensor ops, whose values it cannot
    # know at trace time (graph breaks, or an error under fullgraph, in the xLSTM step compiled whole)
    size, extra = divmod(num_layers, groups)
    bounds = [0]
    for g in range(groups):
        bounds.append(bounds[-1] + size + (g < extra))
    return list(zip(bounds[:-1], bounds[1:]))


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
    """The datasets of a shard; hidden_groups == 0 stores no hidden states (a KD-only cache). The hidden
    datasets come from the hidden dtype's codec (teachercache.codecs)."""
    # Imported here: codecs builds on the names of this module (and imports no torch at load time).
    from tcache.teachercache.codecs import HIDDEN_CODECS

    if hidden_dtype not in HIDDEN_DTYPES:
        raise TcacheError(f"--hidden-dtype {hidden_dtype!r} is unknown; use one of {', '.join(HIDDEN_DTYPES)}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise TcacheError(f"--logprob-dtype {logprob_dtype!r} is unknown; use one of {', '.join(LOGPROB_DTYPES)}")
    ids = token_dtype(vocab_size)
    specs = {INPUT_IDS: FieldSpec(ids, (seq_len,))}
    if hidden_groups > 0:
        group = () if hidden_groups == 1 else (hidden_groups,)
        codec = HIDDEN_CODECS[HIDDEN_DTYPES[hidden_dtype]]
        specs.update(codec.specs((seq_len, *group), hidden_size))  # hidden [, hidden_scale]
    specs[TOPK_LOGPROBS] = FieldSpec(LOGPROB_DTYPES[logprob_dtype], (seq_len, top_k))
    specs[TOPK_IDS] = FieldSpec(ids, (seq_len, top_k))
    return specs
