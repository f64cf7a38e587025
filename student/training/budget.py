"""A distill run's budget: micro-batches and optimizer steps per stage, from --tokens / --steps / --epochs and the
hybrid's --stage1-tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tcache.errors import TcacheError
from tcache.student.training.config import RECIPES, DistillConfig, Stage
from tcache.teachercache import schema


@dataclass
class StagePlan:
    """Where a stage lies in the run: micro-batches [start_micro, end_micro), its optimizer steps and peak lr."""

    stage: Stage
    index: int
    start_micro: int
    end_micro: int
    start_step: int
    steps: int
    lr: float


@dataclass
class Plan:
    """The budget in micro-batches and optimizer steps, stage by stage, and what the run reports at its start."""

    micro_per_epoch: int
    total_micro: int
    total_steps: int
    seq_len: int
    groups: int
    stages: list[StagePlan] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def stage_at(self, micro: int) -> StagePlan:
        """The stage that trains micro-batch `micro` (the last one at the end of the run)."""
        return next((s for s in self.stages if micro < s.end_micro), self.stages[-1])


def plan_budget(cfg: DistillConfig, manifest, world: int = 1) -> Plan:
    """Micro-batches per stage: --tokens / --steps / --epochs set the last stage's budget (stage II, or the
    only stage); the hybrid's stage I gets --stage1-tokens, by default half of stage II's. A micro-batch is
    global: --batch-size rows on each of `world` ranks."""
    rows = cfg.batch_size * world
    micro_per_epoch = manifest.rows // rows
    if micro_per_epoch < 1:
        raise TcacheError(f"the cache has {manifest.rows} rows, fewer than --batch-size {cfg.batch_size} x {world} "
                          "ranks; lower it")
    tokens_per_micro = rows * manifest.seq_len
    if cfg.steps is not None:
        main_micro = cfg.steps * cfg.grad_accum
    elif cfg.tokens is not None:
        main_micro = math.ceil(cfg.tokens / tokens_per_micro)
    else:
        main_micro = int((cfg.epochs or 1.0) * micro_per_epoch)
    stages, micro, step = [], 0, 0
    for i, stage in enumerate(cfg.stages):
        n, lr = main_micro, cfg.lr
        if stage.loss == "match":
            lr = cfg.stage1_lr
            if cfg.stage1_tokens is not None:
                n = math.ceil(cfg.stage1_tokens / tokens_per_micro)
            elif len(cfg.stages) > 1:
                n = main_micro // 2
        steps = max(n // cfg.grad_accum, 1)
        stages.append(StagePlan(stage, i, micro, micro + steps * cfg.grad_accum, step, steps, lr))
        micro, step = micro + steps * cfg.grad_accum, step + steps
    hidden = RECIPES[cfg.recipe].hidden and schema.HIDDEN in manifest.fields
    return Plan(micro_per_epoch, micro, step, manifest.seq_len, manifest.hidden_groups if hidden else 0, stages)
