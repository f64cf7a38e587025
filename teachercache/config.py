"""BuildConfig: every option of `tcache build` (and `tcache plan`), validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tcache.device import PRECISIONS
from tcache.errors import TcacheError
from tcache.fields import opt
from tcache.text import DEFAULT_SEQ_LEN, DataSpec
from tcache.units import parse_count
from tcache.teachercache import schema


@dataclass(frozen=True)
class DataSources(DataSpec):
    """A DataSpec whose --data may be repeated (a build's mixture): several paths, each read with the same
    --data-config, --split and --text-field. BuildConfig keeps one path as a plain DataSpec."""

    path: str | tuple[str, ...] = opt(flag="--data")  # the help stays DataSpec's: --data-weights tells of repeating

    def __post_init__(self) -> None:
        paths = (self.path,) if isinstance(self.path, str) else tuple(str(p) for p in self.path)
        if not paths:
            raise TcacheError("--data is missing; pass --data PATH (repeat it for a mixture)")
        twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
        if twice is not None:
            raise TcacheError(f"--data {twice} is given twice; give each source once (--data-weights sets its share)")
        object.__setattr__(self, "path", paths[0] if len(paths) == 1 else paths)

    @property
    def specs(self) -> tuple[DataSpec, ...]:
        """One DataSpec per path, in order."""
        paths = (self.path,) if isinstance(self.path, str) else self.path
        return tuple(DataSpec(p, self.config, self.split, self.text_field) for p in paths)


def _weights(value, n: int) -> tuple[float, ...]:
    """--data-weights as numbers: `0.7,0.3` from the command line, a list from a config file; one positive,
    finite number per --data."""
    items = [w.strip() for w in value.split(",")] if isinstance(value, str) else list(value)
    fix = f"give one positive number per --data, in order, e.g. --data-weights {','.join(['1'] * n)}"
    if len(items) != n:
        raise TcacheError(f"--data-weights gives {len(items)} weight(s) for {n} --data source(s); {fix}")
    weights = []
    for w in items:
        try:
            x = float(w)
        except (TypeError, ValueError):
            raise TcacheError(f"--data-weights: {w!r} is not a number; {fix}") from None
        if isinstance(w, bool) or not math.isfinite(x) or x <= 0:
            raise TcacheError(f"--data-weights: {w!r} is not a positive number; {fix}")
        weights.append(x)
    return tuple(weights)


@dataclass
class BuildConfig:
    teacher: str = opt()
    """HF causal LM: hub id (HuggingFaceTB/SmolLM2-360M) or local directory."""
    data: DataSources = opt(nested=True)
    """Where the text comes from."""
    tokens: int = opt(text=True)
    """Token budget: 100000, 2.5k, 512M, 1B. Rounded down to whole rows."""
    out: str = opt()
    """Cache directory to create."""
    data_weights: tuple[float, ...] | None = opt(None, text=True, flag="--data-weights", metavar="W,W,...")
    """Repeat --data for a mixture: its sources' shares of the token budget, one per --data in order (0.7,0.3;
    normalised to sum 1); default equal shares. Documents are interleaved by share (docs/format.md)."""
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
        specs = self.data.specs if isinstance(self.data, DataSources) else (self.data,)
        if self.data_weights is not None:
            self.data_weights = _weights(self.data_weights, len(specs))
        if len(specs) == 1:  # one source is a plain DataSpec: config, manifest and identity exactly as before mixtures
            self.data = specs[0]
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

    @property
    def sources(self) -> tuple[DataSpec, ...]:
        """One DataSpec per --data, in order (one for a single source)."""
        return self.data.specs if isinstance(self.data, DataSources) else (self.data,)

    @property
    def shares(self) -> tuple[float, ...]:
        """Each source's share of the token budget (sum 1): --data-weights normalised, else equal."""
        w = self.data_weights or (1.0,) * len(self.sources)
        return tuple(x / sum(w) for x in w)
