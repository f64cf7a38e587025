"""BuildConfig: every option of `tcache build` (and `tcache plan`), validated once."""

from __future__ import annotations

from dataclasses import dataclass

from tcache.errors import TcacheError
from tcache.text import DataSpec
from tcache.teachercache import schema


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
    """Replace an existing cache (or an interrupted build) at --out; the new cache is built beside it and
    swapped in when complete (--overwrite)."""
    resume: bool = False
    """Continue an interrupted build of the same options from its last complete shard (--resume)."""

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
