"""The recall probe (`tcache probe MODEL`): can a causal LM copy a span it saw d tokens earlier? Perplexity on books
barely notices whether a student keeps anything beyond its window; this asks it directly, for any model tcache can
load (a teacher, a student, an export).

Each sequence is random tokens (uniform over the vocabulary, special tokens excluded) in which a span of `span`
tokens repeats at offset d (the second copy starts d tokens after the first):

    [lead random tokens] [A_0 .. A_{span-1}] [random filler] [A_0 .. A_{span-1}]
                         ^ position p                        ^ position p + d

Scored: top-1 accuracy of the model's predictions of A_1 .. A_{span-1} inside the second copy (after A_0, which
nothing announces), per distance. Predicting A_{t+1} at the second copy needs the token d - 1 positions back, so a
window of W keys copies only while d <= W; a model that copies perfectly scores 1.0, one that ignores the past scores
chance (1 / the tokens drawn from). Deterministic: the same seed draws the same sequences for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tcache.device import PRECISIONS
from tcache.errors import TcacheError
from tcache.fields import opt

LEAD = 8
"""Random tokens before the first copy, so it never starts at position 0."""


@dataclass
class ProbeConfig:
    model: str = opt(argument=True)
    """A `tcache distill` output directory, an export, or a HF causal LM id / directory."""
    distances: str = "16,64,256"
    """Offsets d between the two copies of the span, comma-separated (e.g. W/2, 2W, 8W of a W = 32 window)."""
    sequences: int = 64
    """Sequences per distance."""
    span: int = 8
    """Tokens in the repeated span (span - 1 predictions scored per sequence)."""
    seed: int = 0
    """Seed of the random sequences: the same for every model."""
    batch_size: int = 8
    """Sequences per forward."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    dtype: str = opt("auto", choices=PRECISIONS)
    """auto (bf16 GPU, fp32 CPU), fp32, fp16, bf16."""

    def __post_init__(self) -> None:
        try:
            self.offsets = [int(x) for x in str(self.distances).split(",") if x.strip()]
        except ValueError:
            raise TcacheError(f"--distances {self.distances!r} is not a list of integers; pass e.g. 16,64,256") from None
        if self.span < 2:
            raise TcacheError(f"--span must be at least 2 (one scored prediction), got {self.span}")
        if not self.offsets or min(self.offsets) < self.span:
            raise TcacheError(f"--distances {self.distances} must be at least --span {self.span} each (the copies may "
                              "not overlap); raise them or lower --span")
        if self.sequences < 1 or self.batch_size < 1:
            raise TcacheError("--sequences and --batch-size must be at least 1")

    def length(self, d: int) -> int:
        """The sequence length at distance d."""
        return LEAD + d + self.span


def sequences(d: int, n: int, span: int, pool: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
    """n sequences (n, LEAD + d + span) of tokens drawn from `pool`, the span repeated at offset d; and p, the first
    copy's position. Seeded per (seed, d), so one distance's sequences do not depend on which others run."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + d)
    ids = pool[torch.randint(0, len(pool), (n, LEAD + d + span), generator=g)]  # (n, L)
    ids[:, LEAD + d:] = ids[:, LEAD:LEAD + span]  # the second copy
    return ids, LEAD


def recall(logits_fn: Callable[[torch.Tensor], torch.Tensor], cfg: ProbeConfig, pool: torch.Tensor,
           device: torch.device, on_progress: Callable[[int, int], None] | None = None) -> dict[int, float]:
    """Top-1 accuracy per distance of predicting the second copy's tokens after its first; logits_fn maps ids
    (B, T) on `device` to logits (B, T, V)."""
    out, done, total = {}, 0, len(cfg.offsets) * cfg.sequences
    for d in cfg.offsets:
        ids, p = sequences(d, cfg.sequences, cfg.span, pool, cfg.seed)
        start = p + d  # the second copy's first position
        hits = 0
        for b in range(0, cfg.sequences, cfg.batch_size):
            batch = ids[b:b + cfg.batch_size].to(device)  # (B, L)
            logits = logits_fn(batch)  # (B, L, V)
            pred = logits[:, start:start + cfg.span - 1].argmax(-1)  # (B, span - 1): at A_0 .. A_{span-2}
            hits += int((pred == batch[:, start + 1:start + cfg.span]).sum())
            done += len(batch)
            if on_progress:
                on_progress(done, total)
        out[d] = hits / (cfg.sequences * (cfg.span - 1))
    return out


def token_pool(vocab_size: int, special_ids: list[int]) -> torch.Tensor:
    """The ids the probe draws from: the vocabulary without the tokenizer's special tokens."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[i for i in special_ids if 0 <= i < vocab_size]] = False
    return torch.nonzero(keep).flatten()


@torch.no_grad()
def run(cfg: ProbeConfig, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """The probe's result for cfg.model: accuracy per distance, chance, and what ran."""
    from tcache.device import resolve_device, resolve_dtype
    from tcache.student.inference.eval import load_model

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    longest = max(cfg.length(d) for d in cfg.offsets)
    logits_fn, tokenizer, kind, model, extra = load_model(cfg.model, longest, device, dtype)
    vocab = model.head.weight.shape[0] if kind == "tcache-student" else model.config.vocab_size
    pool = token_pool(min(vocab, len(tokenizer)), list(tokenizer.all_special_ids))  # ids both know
    autocast = device.type == "cuda" and dtype is not torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        acc = recall(logits_fn, cfg, pool, device, on_progress)
    return {"model": cfg.model, "kind": kind, "probe": "recall", "accuracy": {str(d): a for d, a in acc.items()},
            "chance": 1 / len(pool), "sequences": cfg.sequences, "span": cfg.span, "seed": cfg.seed,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), **extra}
