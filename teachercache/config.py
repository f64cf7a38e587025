"""BuildConfig: every option of `tcache build` (and `tcache plan`), validated once."""

from __future__ import annotations

from dataclasses import dataclass

from tcache.device import PRECISIONS
from tcache.errors import TcacheError
from tcache.fields import opt
from tcache.text import DEFAULT_SEQ_LEN, DataSpec
from tcache.units import parse_count
from tcache.teachercache import schema


@dataclass
class BuildConfig:
    teacher: str = opt()
    """HF causal LM: hub id (HuggingFaceTB/SmolLM2-360M) or local directory."""
    data: DataSpec = opt(nested=True)
    """Where the text comes from."""
    tokens: int = opt(text=True)
    """Token budget: 100000, 2.5k, 512M, 1B. Rounded down to whole rows."""
    out: str = opt()
    """Cache directory to create."""
    seq_len: int = DEFAULT_SEQ_LEN
    """Tokens per packed row."""
    top_k: int = 64
    """Teacher log-probs kept per position."""
    hidden_groups: int = 1
    """Average the teacher's layers in G contiguous groups (storage grows x G); 0 stores none (KD-only)."""
    hidden_dtype: str = opt(schema.DEFAULT_HIDDEN_DTYPE, choices=schema.HIDDEN_DTYPES)
    """Stored hidden states: nf4 (4-bit NormalFloat, 32-value blocks with an fp16 scale), int8 (per-position
    scale), fp16, bf16."""
    logprob_dtype: str = opt(schema.DEFAULT_LOGPROB_DTYPE, choices=schema.LOGPROB_DTYPES)
    """Stored top-k log-probs."""
    batch_size: int = 0
    """Rows per teacher forward; 0: automatic (8 on CPU, on a GPU up to 64 as its free memory allows)."""
    rows_per_shard: int = opt(1024, flag="--shard-rows")
    """Rows per HDF5 shard."""
    tokenizer_workers: int = -1
    """Processes tokenising ahead of the teacher; 0: a thread; -1: min(8, cores/2) with a GPU teacher, 0 on
    CPU, where the teacher needs the cores."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    dtype: str = opt("auto", choices=PRECISIONS)
    """Teacher compute dtype: auto (bf16 on GPU, fp16 without bf16, fp32 on CPU), bf16, fp16, fp32."""
    revision: str | None = None
    """Hub revision of the teacher."""
    overwrite: bool = False
    """Replace the cache (or interrupted build) at --out: built beside it, swapped in when complete."""
    resume: bool = False
    """Continue an interrupted build (same options) from its last complete shard."""
    share_rank: int = opt(0, cli=False)
    """Under torchrun (set by tcache, not an option): this build caches the shards s with s % share_world ==
    share_rank of the data's rows, in order."""
    share_world: int = opt(1, cli=False)
    """Under torchrun: the number of ranks sharing the rows (see share_rank)."""

    def __post_init__(self) -> None:
        self.tokens = parse_count(self.tokens, "--tokens")
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
        for flag, value, choices in (("--hidden-dtype", self.hidden_dtype, schema.HIDDEN_DTYPES),
                                     ("--logprob-dtype", self.logprob_dtype, schema.LOGPROB_DTYPES),
                                     ("--dtype", self.dtype, PRECISIONS)):
            if value not in choices:
                raise TcacheError(f"{flag} {value!r} is unknown; use one of {', '.join(choices)}")
        if self.tokens < self.seq_len:
            raise TcacheError(
                f"--tokens {self.tokens} is less than one row of --seq-len {self.seq_len}; raise --tokens"
            )

    @property
    def rows(self) -> int:
        return self.tokens // self.seq_len
