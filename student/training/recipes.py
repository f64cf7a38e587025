"""The recipe table: per recipe its model family, how it is sized from the teacher, its stages and the defaults of its
optimiser and loss schedules (docs/distill.md says where each number comes from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tcache.student.models.xlstm import roundup
from tcache.student.training.schedules import Anneal


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe: what it trains, on which loss, with which learning-rate schedule."""

    name: str
    """'1', '2' (--stage) or 'distill' (a one-stage recipe)."""
    loss: str = "distill"
    """distill: CE, top-k KD and alignment mixed by alpha / beta; match: the model's hidden-state matching."""
    train: str = "all"
    """Which parameters train: all, new (only what the teacher did not have), mixer (new + attention), lora
    (new + adapters)."""
    schedule: str = "cosine"
    """cosine (warmup, then down to --min-lr-ratio) or constant (warmup, then flat)."""
    weight_decay: float | None = None
    """AdamW weight decay of this stage; None: --weight-decay (the recipe's)."""


@dataclass(frozen=True)
class Recipe:
    """One student recipe: its model family, how it is sized from the teacher, its stages and the defaults
    of its optimiser and loss schedules (docs/distill.md says where each number comes from)."""

    alpha: Anneal
    """KD weight."""
    beta: Anneal
    """Alignment weight."""
    temperature: Anneal
    """KD temperature."""
    sizes: Callable[[int, int], tuple[int, int, list[int]]] | None = None
    """xLSTM family: (teacher layers L_t, teacher heads H_t) -> (blocks, heads, sLSTM block indices)."""
    model: str = "xlstm"
    """Model family: xlstm (tcache.student.models.xlstm) or hybrid (tcache.student.models.hybrid)."""
    stages: tuple[Stage, ...] = (Stage("distill"),)
    lr: float = 2e-4
    """Peak learning rate of the (last) stage."""
    weight_decay: float = 0.01
    hidden: bool = True
    """Whether the student yields layer-group hidden states to align with the cache's (xLSTM blocks do)."""


def _v1_sizes(layers: int, heads: int) -> tuple[int, int, list[int]]:
    """floor(L_t / 2) blocks alternating sLSTM, mLSTM (sLSTM first); H_s = roundup(H_t, 4)."""
    blocks = max(layers // 2, 1)
    return blocks, roundup(max(heads, 1), 4), list(range(0, blocks, 2))


def _v2_sizes(layers: int, heads: int) -> tuple[int, int, list[int]]:
    """L_t mLSTM blocks; H_s = roundup(H_t, 4)."""
    return layers, roundup(max(heads, 1), 4), []


RECIPES = {
    "v1": Recipe(alpha=Anneal(0.8, 0.5, 0.05), beta=Anneal(0.1, 0.1, 0.0), temperature=Anneal(2.0, 1.0, 0.05),
                 sizes=_v1_sizes),
    "v2": Recipe(alpha=Anneal(0.0, 0.0, 0.0), beta=Anneal(0.8, 0.5, 0.05), temperature=Anneal(1.0, 1.0, 0.0),
                 sizes=_v2_sizes),
    # Hauzenberger et al. 2026: stage I matches each layer's attention output (new parameters only, lr 1e-2,
    # cosine, no weight decay as in LoLCATs' attention transfer: decay would pull the identity-initialised feature
    # maps towards zero); stage II is 0.9 CE + 0.1 KL to the cached top-k, constant lr after warm-up, weight decay 0.1.
    "hybrid": Recipe(alpha=Anneal(0.1, 0.1, 0.0), beta=Anneal(0.0, 0.0, 0.0), temperature=Anneal(1.0, 1.0, 0.0),
                     model="hybrid", lr=1e-5, weight_decay=0.1, hidden=False,
                     stages=(Stage("1", loss="match", train="new", weight_decay=0.0), Stage("2", schedule="constant"))),
}
