"""The one training loop: setup() -> fit (checkpointing) -> save. Reads the cache, never loads a teacher: a
caller that wants targets computed now (an online teacher) passes them in as `targets=`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tcache import configfile, dist, locks, outdir, ownership
from tcache.device import resolve_device
from tcache.errors import Interrupted, TcacheError
from tcache.writefaults import write_error
from tcache.plots import training_plot
from tcache.signals import stop_on_signals
from tcache.student.training import losses, shard
from tcache.student.training.checkpoint import (CONFIG_FILE, RUN_ENTRIES, RunState, cache_identity, checkpoints,
                                       resume_from, run_dir, save_checkpoint, save_run)
from tcache.student.training.budget import Plan, StagePlan, plan_budget
from tcache.student.training.config import RECIPES, DistillConfig, student_config
from tcache.student.training.data import CacheRows, epoch_loader
from tcache.student.training.families import FAMILIES
from tcache.student.training.metrics import METRICS_FILE, MetricsLog, truncate_metrics
from tcache.student.training.runtime import (cap_gpu_memory, compile_step, resolve_loss_chunk, resolve_precision,
                                             resolve_workers)
from tcache.student.training.schedules import annealed, lr_at, window_dropout_at
from tcache.teachercache import schema
from tcache.teachercache.manifest import Manifest, load_manifest
from tcache.teachercache.reader import ShardHasher

TargetFn = Callable[[torch.Tensor], dict]
"""ids (B, T) on the device -> the fields a cache row holds (topk_logprobs, topk_ids, [hidden]) for them."""


@dataclass
class Trainer:
    """A student ready to train: everything setup() resolved from the config, the cache and the device."""

    cfg: DistillConfig
    manifest: Manifest
    device: torch.device
    amp_dtype: torch.dtype
    plan: Plan
    model: torch.nn.Module
    scaler: torch.amp.GradScaler
    chunk: int
    """Positions per chunk of the fused CE + KD; 0: full logits."""
    workers: int
    targets: TargetFn | None = None
    stage: StagePlan | None = None
    params: list = field(default_factory=list)
    opt: torch.optim.Optimizer | None = None
    sharded: bool = False
    """FSDP2 over torchrun's ranks (--shard, shard.py): each rank holds a shard of each weight and its gradient."""
    compiled: Callable | None = None
    """The step's forward and loss terms (`_terms`) through torch.compile as one graph, or None (eager): the hybrid
    with --compile on / cudagraphs (families.step_compile)."""

    def begin_stage(self, sp: StagePlan) -> torch.optim.Optimizer:
        """Make `sp` the stage that trains: the model's trainable set and mode, and a fresh AdamW over it."""
        stage, cfg, device = sp.stage, self.cfg, self.device
        self.model.set_stage(stage.train if stage.loss == "match" else cfg.train,
                             "match" if stage.loss == "match" else "hybrid")
        if stage.loss == "match":  # which per-layer objective the mixers keep (--match-loss)
            self.model.set_match_loss(cfg.match_loss)
        if self.sharded:
            shard.begin_stage(self.model, stage.loss == "match")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        wd = cfg.weight_decay if stage.weight_decay is None else stage.weight_decay
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=sp.lr, betas=(0.9, 0.95),
                                     fused=device.type == "cuda")
        # Several backwards per optimizer step (--grad-accum > 1; torchrun's all-reduce wants a fixed set): .grad
        # lives from the start and is zeroed in place. Under CUDA graphs the backward's outputs are buffers the next
        # replay overwrites; with .grad None autograd installs that buffer as .grad and the next micro-batch's
        # replay overwrites it (pytorch/pytorch#169545). One backward per step: the optimizer has read .grad
        # before the next replay, so it is set to None (no add kernel per parameter: 2.3 ms a stage II step).
        # FSDP2 (--shard fsdp) accumulates each backward's reduce-scattered gradient into .grad itself
        self.keep_grads = (self.cfg.grad_accum > 1 or dist.world() > 1) and not self.sharded
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad and self.keep_grads else None
        self.stage = sp
        return self.opt

    def weights(self, epoch: int, step_in_epoch: int) -> losses.Weights:
        c = self.cfg
        return losses.Weights(annealed(c.alpha, epoch, step_in_epoch), annealed(c.beta, epoch, step_in_epoch),
                              annealed(c.temperature, epoch, step_in_epoch))

    def terms(self, batch: dict, w: losses.Weights) -> dict[str, torch.Tensor]:
        """The student's forward on one micro-batch and each loss term (fp32 scalars), compiled or not."""
        fields = (schema.INPUT_IDS, schema.TOPK_LOGPROBS, schema.TOPK_IDS, schema.HIDDEN)
        # autocast around the call, not inside _terms: AOTAutograd's cache refuses a graph that enters autocast
        # itself, so a compiled step's every cold start re-ran AOTAutograd ("_enter_autocast", torch 2.13); each
        # loss term casts to fp32 where it needs it
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not torch.float32):
            return (self.compiled or self._terms)({k: batch[k] for k in fields if k in batch}, w.temperature)

    def _terms(self, batch: dict, temperature: float) -> dict[str, torch.Tensor]:
        ids = batch[schema.INPUT_IDS]  # (B, T)
        # features() and the head, never forward(): under FSDP2 only features() carries the root's hooks (shard.py)
        if self.stage.stage.loss == "match":  # teacher-forced: the model keeps each layer's matching error
            self.model.features(ids)
            return {"match": self.model.match_loss()}
        t_lp, t_ids = batch[schema.TOPK_LOGPROBS], batch[schema.TOPK_IDS]  # (B, T, k) x2
        groups, tail = self.plan.groups, self.cfg.kd_tail
        x, s_hidden = self.model.features(ids, groups=groups)  # (B, T, D), (B, T, G, D)
        if self.chunk:
            ce, kd = losses.ce_kd_chunked(x, self.model.head, ids, t_lp, t_ids, temperature, tail, self.chunk)
        else:
            logits = self.model.head(x)  # (B, T, V)
            ce = losses.ce_loss(logits, ids)
            kd = losses.kd_loss(logits, t_lp, t_ids, temperature, tail)
        al = losses.align_loss(s_hidden, batch[schema.HIDDEN]) if groups else torch.zeros((), device=self.device)
        return {"ce": ce, "kd": kd, "align": al}

    def micro_step(self, batch: dict, w: losses.Weights, micro: int = 0) -> dict[str, torch.Tensor]:
        """Forward, mix, backward of one micro-batch (on the device; `micro` its index in the run). Returns the
        detached fp32 terms and loss, left on the device: reading them would make the CPU wait for the GPU."""
        if self.cfg.window_dropout:
            p = window_dropout_at(self.cfg.window_dropout, self.cfg.window_dropout_final, micro,
                                  self.plan.total_steps * self.cfg.grad_accum)
            self.model.drop_windows(p, self.cfg.seed * 1_000_003 + micro)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph outputs of the last step may be overwritten
        if self.targets is not None and self.stage.stage.loss != "match":
            batch = {**batch, **self.targets(batch[schema.INPUT_IDS])}
        terms = self.terms(batch, w)
        terms["loss"] = losses.mix(terms, w)
        self.scaler.scale(terms["loss"] / self.cfg.grad_accum).backward()
        return {name: v.detach().float() for name, v in terms.items()}

    def optimizer_step(self, lr: float) -> torch.Tensor:
        """Unscale, clip, step, zero; returns the gradient norm before clipping (on the device)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        # under torchrun: one all-reduce of the accumulated gradients per optimizer step (by hand, not DDP: the loop
        # calls the model's features() and head in chunks, which DDP's forward hooks would not see); FSDP2 has
        # averaged them already, in its reduce-scatter after each backward
        if not self.sharded:
            dist.mean_([p.grad for p in self.params])
        self.scaler.unscale_(self.opt)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        gn = (shard.clip_grad_norm_ if self.sharded else torch.nn.utils.clip_grad_norm_)(self.params, clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=not self.keep_grads)  # see begin_stage (CUDA graphs and accumulation)
        return gn


def setup(cfg: DistillConfig, manifest: Manifest | None = None, targets: TargetFn | None = None) -> Trainer:
    """Everything before the first step, and every refusal that does not need the output directory:
    device, precision, the student's size, the budget, kernels, the model and its optimizer."""
    manifest = manifest or load_manifest(cfg.cache)
    if cfg.online_teacher and targets is None:
        raise TcacheError("--online-teacher is set but no target source was passed; build one with "
                          "tcache.teachercache.online.online_targets and pass it as targets=")
    device = dist.init(resolve_device(cfg.device))
    amp_dtype = resolve_precision(cfg.precision, device)
    plan = plan_budget(cfg, manifest, dist.world())
    if cfg.uses_alignment and plan.groups == 0:
        raise TcacheError(f"{cfg.cache} has no hidden states but the alignment weight (--beta) is > 0; "
                          "rebuild with --hidden-groups >= 1 or pass --beta 0")
    if RECIPES[cfg.recipe].model == "xlstm":
        blocks = student_config(cfg, manifest).num_blocks  # refuses bad sizes before anything loads
        if cfg.uses_alignment and plan.groups > blocks:
            raise TcacheError(f"the cache has {plan.groups} hidden groups but the student only {blocks} "
                              f"blocks; rebuild with --hidden-groups <= {blocks}, raise --blocks, "
                              "or pass --beta 0")
    budget = cap_gpu_memory(cfg.max_gpu_memory, device)
    sharded = shard.resolve_shard(cfg, manifest, device, budget, amp_dtype)
    model, info = FAMILIES[RECIPES[cfg.recipe].model](cfg, manifest, device, budget, sharded)
    if sharded:
        shard.shard_model(model, device, amp_dtype)
    chunk, workers = resolve_loss_chunk(cfg.loss_chunk, device), resolve_workers(cfg.workers, device)
    tr = Trainer(cfg, manifest, device, amp_dtype, plan, model, torch.amp.GradScaler(
        device.type, enabled=amp_dtype is torch.float16), chunk, workers, targets, sharded=sharded)
    if info.get("step_compile"):  # one graph for forward + losses; mode reduce-overhead: CUDA graphs too
        tr.compiled = compile_step(tr._terms, info["step_compile"], fallback=cfg.compile == "auto",
                                   memory_budget=info.get("activation_budget"),
                                   regions=info.get("compile_scope") == "regions")
    tr.begin_stage(plan.stages[0])
    # training mode from here, for every caller (benchmarks time setup()'s Trainer): transformers models load in
    # eval mode, where their layers skip activation checkpointing
    model.train()
    plan.info = {
        **info, "params": model.param_counts(), "device": str(device),
        "precision": str(amp_dtype).removeprefix("torch."), "total_steps": plan.total_steps,
        "tokens_per_step": cfg.batch_size * dist.world() * cfg.grad_accum * plan.seq_len, "resumed_from_step": None,
        "world_size": dist.world(), "shard": "fsdp" if sharded else "none",
        "hidden_groups": plan.groups, "loss_chunk": chunk, "workers": workers, "max_gpu_memory": cfg.max_gpu_memory,
        "stages": [{"stage": s.stage.name, "loss": s.stage.loss, "steps": s.steps, "lr": s.lr} for s in plan.stages],
    }
    return tr


StepFn = Callable[[dict, Plan], None]


def distill(cfg: DistillConfig, on_start: Callable[[dict], None] | None = None, on_step: StepFn | None = None,
            warn: Callable[[str], None] | None = None, targets: TargetFn | None = None) -> dict:
    """Train (or resume) a student. The first SIGINT / SIGTERM ends the run at the next optimizer step with
    a checkpoint (Interrupted, resumable); a second one stops at once, keeping the last checkpoint. Every
    shard's sha256 is checked in a background thread while training reads it; no checkpoint or student is
    saved before its shards have passed."""
    with stop_on_signals(graceful=True) as stop:
        outdir.check_writable(Path(cfg.out))  # before the model loads
        with locks.locked(cfg.out):  # one command per run directory, for the whole run
            manifest = load_manifest(cfg.cache)
            hasher = ShardHasher(cfg.cache, manifest)
            try:
                tr = setup(cfg, manifest, targets)
                # rank 0 decides where the run writes (and clears what --overwrite replaces); the others follow
                work = dist.broadcast(run_dir(cfg) if dist.is_main() else None)
                if not dist.is_main():
                    on_start = on_step = None  # progress and metrics come from rank 0 only
                hasher.check()
                return _fit_and_save(tr, work, hasher, stop, on_start, on_step, warn or (lambda msg: None))
            except OSError as e:  # a full disk or a read-only run outside the saves (metrics, the plot): one line
                resumable = checkpoints(Path(cfg.out)) or checkpoints(outdir.staging(Path(cfg.out)))
                raise write_error(cfg.out, e, "rerun with --resume" if resumable else "rerun") or e from None
            finally:
                hasher.close()


def _fit_and_save(tr: Trainer, work: Path, hasher: ShardHasher, stop, on_start, on_step,
                  warn: Callable[[str], None]) -> dict:
    cfg, plan, device = tr.cfg, tr.plan, tr.device
    identity = cache_identity(tr.manifest)
    state, ckpt = RunState(), None
    if cfg.resume:
        ckpt, state = resume_from(work, cfg, tr, identity, warn)
        plan.info["resumed_from_step"] = state.step
    if stop.requested:
        raise Interrupted(stop.signum, "nothing was trained")
    main = dist.is_main()
    if main:  # tcache's marker first: everything the run writes there is listed before it is created
        ownership.claim(work, "run", RUN_ENTRIES)
    else:
        work.mkdir(parents=True, exist_ok=True)
    if ckpt is not None and main:
        truncate_metrics(work / METRICS_FILE, state.step)
    if main:
        configfile.write_text(work / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))
        configfile.write(cfg, work / configfile.CONFIG_FILE, "distill")  # `--config RUN/config.yaml` repeats the run
    if on_start:
        on_start(plan.info)

    rows = CacheRows(cfg.cache, with_hidden=plan.groups > 0, with_targets=tr.targets is None)
    metrics_f = open(work / METRICS_FILE if main else os.devnull, "a")
    # Loss sums stay on the device until a step is logged: a float() per micro-batch would make the CPU
    # wait for the GPU each time, and the next batch's host work would no longer overlap its compute.
    zero = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    # Rate and elapsed time count from this (re)start; elapsed0 carries what a resumed run had before.
    t_start, tokens_start, elapsed0 = time.perf_counter(), state.tokens, state.elapsed
    last: dict = {}
    log = MetricsLog(metrics_f, lambda r: on_step(r, plan) if on_step else None)
    try:
        while state.micro < plan.total_micro:
            epoch, j = divmod(state.micro, plan.micro_per_epoch)
            for batch in epoch_loader(rows, cfg.batch_size, cfg.seed, epoch, j, tr.workers, device.type == "cuda",
                                      dist.rank(), dist.world()):
                sp = plan.stage_at(state.micro)
                if sp is not tr.stage:
                    tr.begin_stage(sp)  # the next stage: its trainable set, mode and optimizer
                w = tr.weights(epoch, j // cfg.grad_accum)  # by the optimizer step within this epoch
                batch = {n: t.to(device, non_blocking=True) for n, t in batch.items()}
                terms = tr.micro_step(batch, w, state.micro)
                for name, v in terms.items():
                    sums[name] = sums.get(name, zero) + v / cfg.grad_accum
                state.micro += 1
                state.tokens += batch[schema.INPUT_IDS].numel() * dist.world()
                j += 1
                if state.micro % cfg.grad_accum == 0:
                    lr = lr_at(state.step - sp.start_step, sp.steps, sp.lr, cfg.warmup, cfg.min_lr_ratio,
                               sp.stage.schedule)
                    gn = tr.optimizer_step(lr)
                    state.step += 1
                    now = time.perf_counter()
                    elapsed = elapsed0 + (now - t_start)
                    record = {"step": state.step, "stage": sp.stage.name, "epoch": epoch, "tokens": state.tokens,
                              "alpha": w.alpha,
                              "beta": w.beta, "temperature": w.temperature, "lr": lr,
                              "tokens_per_s": (state.tokens - tokens_start) / max(now - t_start, 1e-9),
                              "elapsed_s": elapsed}
                    dist.mean_(list(sums.values()))  # the logged terms are the global batch's
                    values = {**sums, "grad_norm": gn}
                    if tr.scaler.is_enabled():
                        # the scale tensor itself: get_scale() would read it now and wait for the GPU
                        values["loss_scale"] = getattr(tr.scaler, "_get_scale_async", tr.scaler.get_scale)()
                    last = log.put(record, values) or last
                    sums = {}
                    hasher.check()  # a corrupt shard ends the run as soon as its hash is known
                    due = cfg.ckpt_every and state.step % cfg.ckpt_every == 0
                    stopping = dist.any_rank(stop.requested, device)
                    if (due or stopping) and state.micro < plan.total_micro:
                        last = log.flush() or last
                        state.elapsed = elapsed
                        hasher.wait()  # a checkpoint holds only training on verified shards
                        ckpt = save_checkpoint(work, cfg, tr, state, identity)  # rank 0's, or every rank's shards
                        if main:
                            training_plot(work, warn)  # RUN/training.png, from the flushed metrics
                        dist.barrier()
                    if stopping and state.micro < plan.total_micro:
                        e = Interrupted(stop.signum, f"checkpoint at step {state.step} saved in {work}")
                        e.resumable = True
                        raise e
                if state.micro >= plan.total_micro:
                    break
        last = log.flush() or last
    except Interrupted as e:
        e.resumable = e.resumable or ckpt is not None
        if not e.detail:
            e.detail = (f"the checkpoint of step {ckpt.name.removeprefix('step-').lstrip('0') or 0} is kept"
                        if ckpt is not None else "no checkpoint to resume from (use --ckpt-every N)")
        raise
    finally:
        metrics_f.close()
    state.elapsed = elapsed0 + (time.perf_counter() - t_start)

    return save_run(tr, work, state, last, identity, ckpt, hasher, warn)
