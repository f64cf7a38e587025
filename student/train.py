"""The one training loop: setup -> fit (checkpointing) -> save. Reads only the cache, never the teacher."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import tcache
from tcache.student import losses
from tcache.student.data import CacheRows, epoch_loader
from tcache.student.io import load_teacher_parts, save_student
from tcache.student.model import Student, StudentConfig, recipe_sizes, resolve_kernels
from tcache.student.schedules import Anneal, annealed, lr_at
from tcache import outdir
from tcache.teachercache import schema
from tcache.teachercache.manifest import Manifest, load_manifest
from tcache.units import parse_bytes
from tcache.errors import Interrupted, TcacheError
from tcache.teachercache.reader import ShardHasher
from tcache.signals import stop_on_signals
from tcache.teachercache.teacher import TeacherPass
from tcache.hf import load_teacher, tokenizer_sha256
from tcache.device import resolve_device, resolve_dtype

CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "distill_config.json"

# Defaults of each recipe's loss weights and temperature (docs/distill.md says where each comes from).
RECIPE_LOSSES = {
    "v1": {"alpha": Anneal(0.8, 0.5, 0.05), "beta": Anneal(0.1, 0.1, 0.0), "temperature": Anneal(2.0, 1.0, 0.05)},
    "v2": {"alpha": Anneal(0.0, 0.0, 0.0), "beta": Anneal(0.8, 0.5, 0.05), "temperature": Anneal(1.0, 1.0, 0.0)},
}
# Fields that may differ between a run and its resumption.
RESUMABLE_DIFFS = {"resume", "overwrite", "workers", "ckpt_every", "keep_ckpts", "device", "cache", "out",
                   "compile", "max_gpu_memory"}

# --compile -> torch.compile mode (None: eager)
COMPILE_MODES = {"auto": None, "off": None, "on": "default", "cudagraphs": "reduce-overhead"}


def resolve_compile(choice: str, device: torch.device) -> str:
    """auto -> cudagraphs where measured (H100, benchmarks/distill.py: 2.2x the eager step), else off."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "cudagraphs"
    return "off"


def cap_gpu_memory(text: str | None, device: torch.device) -> int | None:
    """A T4's budget on a larger GPU: the caching allocator refuses to grow past the cap (an OOM error
    then means the run would not fit the smaller card). Returns the cap in bytes (None: no cap)."""
    if text is None:
        return None
    if device.type != "cuda":
        raise TcacheError("--max-gpu-memory needs a CUDA device; drop it on CPU")
    total = torch.cuda.get_device_properties(device).total_memory
    cap = parse_bytes(text)
    if cap > total:
        raise TcacheError(f"--max-gpu-memory {text} exceeds this GPU's {total / 2**30:.1f} GiB; lower it")
    torch.cuda.set_per_process_memory_fraction(cap / total, device.index if device.index is not None else 0)
    return cap


def resolve_loss_chunk(loss_chunk: int, device: torch.device) -> int:
    """--loss-chunk -1 -> 1024 positions on a GPU (saves the (B, T, V) logits), full logits on CPU."""
    return loss_chunk if loss_chunk >= 0 else (1024 if device.type == "cuda" else 0)


@dataclass
class DistillConfig:
    cache: str
    """Cache directory made by `tcache build` (CACHE argument)."""
    out: str
    """Run directory: student, checkpoints, metrics (--out)."""
    recipe: str = "v1"
    """v1 (floor(L/2) alternating sLSTM/mLSTM, CE+KD+align) or v2 (L mLSTM, CE+align) (--recipe)."""
    blocks: int | None = None
    """Override the recipe's number of blocks (--blocks)."""
    heads: int | None = None
    """Override the recipe's heads roundup(H_t, 4) (--heads)."""
    slstm_at: list[int] | None = None
    """Override which blocks are sLSTM (--slstm-at)."""
    tokens: int | None = None
    """Token budget (--tokens); exclusive with --steps and --epochs."""
    steps: int | None = None
    """Optimizer-step budget (--steps)."""
    epochs: float | None = None
    """Passes over the cache (--epochs); the default budget is 1 epoch."""
    batch_size: int = 8
    """Rows per micro-batch (--batch-size)."""
    grad_accum: int = 4
    """Micro-batches per optimizer step (--grad-accum)."""
    lr: float = 2e-4
    """Peak learning rate (--lr)."""
    warmup: float = 0.1
    """Warmup fraction of the steps (--warmup)."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of --lr (--min-lr-ratio)."""
    weight_decay: float = 0.01
    """AdamW weight decay (--weight-decay)."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables (--grad-clip)."""
    alpha: Anneal | None = None
    """KD weight schedule; None takes the recipe's (--alpha)."""
    beta: Anneal | None = None
    """Alignment weight schedule; None takes the recipe's (--beta)."""
    temperature: Anneal | None = None
    """KD temperature schedule; None takes the recipe's (--temperature)."""
    kd_tail: str = "bucket"
    """How the teacher's mass outside the top-k enters KD: bucket or renorm (--kd-tail)."""
    precision: str = "auto"
    """auto (bf16 GPU, fp16 GPU without bf16, fp32 CPU), fp32, fp16, bf16 (--precision)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N (--device)."""
    seed: int = 0
    """Model init and data order (--seed)."""
    workers: int = -1
    """DataLoader worker processes reading the cache; -1 = automatic: min(4, cores / 2) on a GPU, 0 on CPU
    (--workers)."""
    loss_chunk: int = -1
    """Positions per chunk of the fused CE + KD over the vocabulary (no (B, T, V) logits kept); 0 computes
    full logits; -1 = automatic: 1024 on a GPU, 0 on CPU (--loss-chunk)."""
    compile: str = "auto"
    """torch.compile each xLSTM block: off, on (fused kernels), cudagraphs (also replays each block's
    kernels as a CUDA graph: the step is bound by Python's kernel launches otherwise); auto = cudagraphs
    on GPUs of compute capability >= 8.0, off elsewhere (T4, CPU) (--compile)."""
    max_gpu_memory: str | None = None
    """Cap this process's GPU memory, e.g. 16GB, to test a smaller card's budget on a larger one
    (--max-gpu-memory)."""
    ckpt_every: int = 0
    """Checkpoint every N optimizer steps; 0: only the final student (--ckpt-every)."""
    keep_ckpts: int = 2
    """Checkpoints kept (--keep-ckpts)."""
    resume: bool = False
    """Continue from the newest checkpoint in --out (--resume)."""
    overwrite: bool = False
    """Replace a non-empty --out (--overwrite)."""
    mlstm_kernel: str = "auto"
    """mLSTM kernel (--mlstm-kernel)."""
    slstm_backend: str = "auto"
    """sLSTM backend (--slstm-backend)."""
    online_teacher: str | None = None
    """For comparison runs: a HF teacher held on the device computes the targets of every batch instead of
    the cache (same rows, same top-k and layer groups) (--online-teacher)."""

    def __post_init__(self) -> None:
        if self.recipe not in RECIPE_LOSSES:
            raise TcacheError(f"--recipe {self.recipe!r} is unknown; use v1 or v2")
        budgets = [n for n, v in (("--tokens", self.tokens), ("--steps", self.steps), ("--epochs", self.epochs))
                   if v is not None]
        if len(budgets) > 1:
            raise TcacheError(f"{' and '.join(budgets)} both set; give one budget")
        for flag, v in (("--tokens", self.tokens), ("--steps", self.steps), ("--epochs", self.epochs)):
            if v is not None and v <= 0:
                raise TcacheError(f"{flag} must be positive, got {v}")
        for flag, v in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum)):
            if v < 1:
                raise TcacheError(f"{flag} must be at least 1, got {v}")
        if not self.lr > 0:
            raise TcacheError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise TcacheError(f"--warmup is a fraction of the run in [0, 1), got {self.warmup}")
        if self.kd_tail not in losses.KD_TAILS:
            raise TcacheError(f"--kd-tail {self.kd_tail!r} is unknown; use bucket or renorm")
        if self.workers < -1:
            raise TcacheError(f"--workers must be -1 (automatic), 0 or more, got {self.workers}")
        if self.loss_chunk < -1:
            raise TcacheError(f"--loss-chunk must be -1 (automatic), 0 (full logits) or more, got {self.loss_chunk}")
        if self.max_gpu_memory is not None:
            parse_bytes(self.max_gpu_memory)
        if self.compile not in COMPILE_MODES:
            raise TcacheError(f"--compile {self.compile!r} is unknown; use one of {', '.join(COMPILE_MODES)}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise TcacheError(f"--precision {self.precision!r} is unknown; use auto, fp32, fp16 or bf16")
        defaults = RECIPE_LOSSES[self.recipe]
        self.alpha = self.alpha or defaults["alpha"]
        self.beta = self.beta or defaults["beta"]
        self.temperature = self.temperature or defaults["temperature"]
        for flag, a in (("--alpha", self.alpha), ("--beta", self.beta)):
            if not (0 <= a.final <= 1 and 0 <= a.start <= 1):
                raise TcacheError(f"{flag} values must lie in [0, 1], got {a.start}:{a.final}")
        if self.alpha.start + self.beta.start > 1 or self.alpha.final + self.beta.final > 1:
            raise TcacheError("--alpha + --beta exceed 1, which would give CE a negative weight; lower one of them")
        if min(self.temperature.start, self.temperature.final) <= 0:
            raise TcacheError("--temperature must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunState:
    """Where training stands; with the config this is everything a resume needs."""

    micro: int = 0          # micro-batches done, over all epochs
    step: int = 0           # optimizer steps done
    tokens: int = 0         # tokens trained on
    elapsed: float = 0.0    # seconds of training so far


@dataclass
class Plan:
    micro_per_epoch: int
    total_micro: int
    total_steps: int
    seq_len: int
    groups: int
    info: dict = field(default_factory=dict)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The teacher's dtype rules (resolve_dtype), plus: fp16 autocast needs CUDA (CPU autocast is bf16 only)."""
    if precision == "fp16" and device.type != "cuda":
        raise TcacheError("--precision fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    return resolve_dtype(precision, device, flag="--precision")


def student_config(cfg: DistillConfig, manifest: Manifest) -> StudentConfig:
    t = manifest.teacher
    blocks, heads, slstm_at = recipe_sizes(cfg.recipe, manifest.num_layers, int(t.get("num_attention_heads") or 0))
    if cfg.blocks is not None and cfg.slstm_at is None and cfg.recipe == "v1":
        slstm_at = list(range(0, cfg.blocks, 2))  # keep v1's alternation at the new depth
    blocks = cfg.blocks if cfg.blocks is not None else blocks
    slstm_at = cfg.slstm_at if cfg.slstm_at is not None else slstm_at
    eps = (t.get("config") or {}).get("rms_norm_eps", 1e-5)
    return StudentConfig(
        vocab_size=manifest.vocab_size, hidden_size=manifest.hidden_size, num_blocks=blocks,
        num_heads=cfg.heads if cfg.heads is not None else heads, slstm_at=slstm_at,
        context_length=manifest.seq_len, norm_eps=float(eps), recipe=cfg.recipe,
        mlstm_kernel=cfg.mlstm_kernel, slstm_backend=cfg.slstm_backend,
    )


def plan_budget(cfg: DistillConfig, manifest: Manifest) -> Plan:
    micro_per_epoch = manifest.rows // cfg.batch_size
    if micro_per_epoch < 1:
        raise TcacheError(f"the cache has {manifest.rows} rows, fewer than --batch-size {cfg.batch_size}; lower it")
    tokens_per_micro = cfg.batch_size * manifest.seq_len
    if cfg.steps is not None:
        total_micro = cfg.steps * cfg.grad_accum
    elif cfg.tokens is not None:
        total_micro = math.ceil(cfg.tokens / tokens_per_micro)
    else:
        total_micro = int((cfg.epochs or 1.0) * micro_per_epoch)
    total_steps = max(total_micro // cfg.grad_accum, 1)
    groups = manifest.hidden_groups if schema.HIDDEN in manifest.fields else 0
    return Plan(micro_per_epoch, total_steps * cfg.grad_accum, total_steps, manifest.seq_len, groups)


def cache_identity(manifest: Manifest) -> str:
    """What a resumed run must train on: the cache's shard hashes, fields and teacher (not its path)."""
    import hashlib

    key = {"shards": [s.sha256 for s in manifest.shards], "fields": manifest.fields, "seq_len": manifest.seq_len,
           "top_k": manifest.top_k, "tokenizer": manifest.tokenizer.get("sha256"),
           "teacher": [manifest.teacher.get("name_or_path"), manifest.teacher.get("revision")]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / CKPT_DIR).glob("step-*[0-9]")) if (run / CKPT_DIR).is_dir() else []


def run_dir(cfg: DistillConfig) -> Path:
    """Where this run writes: --out itself, or (--overwrite of a finished run) its staging sibling, swapped
    in when the new student is complete. Never deletes what tcache did not write, nor the input cache."""
    out, cache = Path(cfg.out).resolve(), Path(cfg.cache).resolve()
    if out == cache or cache in out.parents:
        raise TcacheError(f"--out {cfg.out} is inside the input cache {cfg.cache}; choose another --out")
    if out in cache.parents:
        raise TcacheError(f"--out {cfg.out} contains the input cache {cfg.cache}; choose another --out")
    out = Path(cfg.out)
    k = outdir.classify(out, "run")
    if k in ("missing", "empty"):
        if cfg.resume:
            raise TcacheError(f"--resume: no checkpoint in {out / CKPT_DIR}; run without --resume (and --ckpt-every N)")
        return out
    if cfg.resume:
        stage = outdir.staging(out)
        if cfg.overwrite and _checkpoints(stage):
            return stage
        if not _checkpoints(out):
            raise TcacheError(f"--resume: no checkpoint in {out / CKPT_DIR}; run without --resume (and --ckpt-every N)")
        return out
    if not cfg.overwrite:
        raise TcacheError(f"--out {out} is not empty; pass --overwrite to replace it, or --resume to continue it")
    if not (out / "student.json").exists():  # an unfinished run: no student to protect
        outdir.remove_ours(out, "run")
        return out
    return outdir.fresh_staging(out, "run")


def _check_resume_config(cfg: DistillConfig, ckpt: Path) -> None:
    saved = json.loads((ckpt / CONFIG_FILE).read_text())
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as saved
    diffs = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_DIFFS and saved.get(k) != now.get(k))
    if diffs:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diffs[:4])
        raise TcacheError(
            f"--resume: the checkpoint in {ckpt.parent.parent} was trained with another configuration ({shown}); "
            "use the original options or start a new --out"
        )


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(model: Student) -> dict[str, torch.Tensor]:
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in frozen}


def save_checkpoint(out: Path, cfg: DistillConfig, model: Student, opt, scaler, state: RunState,
                    identity: str = "") -> Path:
    """A checkpoint directory appears only complete (written as .partial, then renamed)."""
    from safetensors.torch import save_file

    final = out / CKPT_DIR / f"step-{state.step:07d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                "state": asdict(state), "cache_identity": identity}, tmp / "trainer.pt")
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted((out / CKPT_DIR).glob("step-*[0-9]"))[:-max(cfg.keep_ckpts, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model: Student, opt, scaler, identity: str = "") -> RunState:
    from safetensors.torch import load_file

    blob = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    if identity and blob.get("cache_identity", identity) != identity:
        raise TcacheError(f"--resume: the checkpoint in {ckpt.parent.parent} was trained on another cache (other "
                          "shards or fields); pass the cache it was trained on, or start a new --out")
    missing, unexpected = model.load_state_dict(load_file(str(ckpt / "trainable.safetensors")), strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise TcacheError(f"--resume: checkpoint {ckpt} does not fit this student; start a new --out")
    opt.load_state_dict(blob["optimizer"])
    scaler.load_state_dict(blob["scaler"])
    _set_rng_state(blob["rng"])
    return RunState(**blob["state"])


def resume_from(run: Path, cfg: DistillConfig, model: Student, opt, scaler, identity: str,
                warn: Callable[[str], None]) -> tuple[Path, RunState]:
    """The newest checkpoint that loads; a torn or truncated one (a crash while the disk filled, say) is
    skipped with a warning. A checkpoint of another configuration or cache is refused, not skipped."""
    for ckpt in reversed(_checkpoints(run)):
        try:
            _check_resume_config(cfg, ckpt)
            return ckpt, load_checkpoint(ckpt, model, opt, scaler, identity)
        except TcacheError:
            raise
        except Exception as e:  # unreadable files: safetensors, pickle, json, OSError
            warn(f"checkpoint {ckpt.name} does not load ({type(e).__name__}); trying the one before it")
    raise TcacheError(f"--resume: no checkpoint in {run / CKPT_DIR} loads; start a new --out")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`; a torn last line (a kill during a write) is dropped."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _online_teacher(cfg: DistillConfig, manifest: Manifest, device: torch.device) -> TeacherPass:
    """The build's own teacher pass, so online targets come from the code that made the cache."""
    model, tokenizer = load_teacher(cfg.online_teacher, device, resolve_dtype("auto", device))
    if tokenizer_sha256(tokenizer) != manifest.tokenizer["sha256"]:
        raise TcacheError(f"--online-teacher {cfg.online_teacher}: its tokenizer differs from the cache's; "
                          "pass the teacher the cache was built with")
    return TeacherPass(model, list(manifest.layer_groups), manifest.top_k)


def _online_targets(teacher: TeacherPass, ids: torch.Tensor, groups: int) -> dict:
    """The targets a cache row holds, computed now by the teacher (same top-k, same layer groups)."""
    tgt = teacher(ids)
    out = {schema.TOPK_LOGPROBS: tgt.topk_logprobs, schema.TOPK_IDS: tgt.topk_ids}  # (B, T, k) x2
    if groups:
        out[schema.HIDDEN] = tgt.hidden  # (B, T, G, D)
    return out


class _MetricsLog:
    """Writes one metrics line per optimizer step, one step late: the step's values are copied to the
    host without blocking and read when the next step has been queued, so logging never makes the CPU
    wait for the GPU (measured: a float() per step held distill from disk at 0.83x of the in-GPU step)."""

    def __init__(self, f, on_record: Callable[[dict], None]):
        self.f, self.on_record = f, on_record
        self.pending: tuple[dict, list[str], torch.Tensor, object] | None = None

    def put(self, record: dict, values: dict) -> dict | None:
        """Queue this step's record; returns the previous step's completed record, if any."""
        done = self.flush()
        names = list(values)
        device = values["loss"].device
        stacked = torch.stack([torch.as_tensor(values[n], device=device).float().reshape(()) for n in names])  # (n,)
        if stacked.is_cuda:
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = stacked, None
        self.pending = (record, names, host, event)
        return done

    def flush(self) -> dict | None:
        if self.pending is None:
            return None
        record, names, host, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        record = {**record, **{n: float(v) for n, v in zip(names, host.tolist())}}
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        self.on_record(record)
        return record


def make_student(cfg: DistillConfig, scfg: StudentConfig, mlstm_kernel: str, slstm_backend: str,
                 device: torch.device, amp_dtype: torch.dtype):
    """(model with the cache's teacher parts, trainable params, AdamW, GradScaler), seeded by --seed."""
    torch.manual_seed(cfg.seed)
    model = Student(scfg, mlstm_kernel=mlstm_kernel, slstm_backend=slstm_backend)
    model.load_teacher_parts(load_teacher_parts(cfg.cache))
    model.to(device)
    mode = COMPILE_MODES[resolve_compile(cfg.compile, device)]
    if mode is not None:
        for blk in model.blocks.blocks:
            blk.compile(mode=mode)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    # Gradients live from the start and are zeroed in place, never set to None. Under CUDA graphs
    # (--compile cudagraphs) the backward's outputs are buffers the next replay overwrites: with
    # .grad None, autograd installs that buffer itself as .grad, and the next micro-batch's replay
    # overwrites it ("accessing tensor output of CUDAGraphs that has been overwritten", or silently
    # wrong sums; pytorch/pytorch#169545). With .grad allocated, each backward adds into it at once.
    for p in params:
        p.grad = torch.zeros_like(p)
    return model, params, opt, scaler


def forward_backward(model: Student, batch: dict, groups: int, alpha: float, beta: float, temperature: float,
                     kd_tail: str, chunk: int, amp_dtype: torch.dtype, scaler, grad_accum: int) -> dict:
    """One micro-batch: the student's forward, the three loss terms mixed, the backward. Returns the
    detached fp32 terms, left on the device (reading them would wait for the GPU)."""
    ids = batch[schema.INPUT_IDS]  # (B, T)
    t_lp, t_ids = batch[schema.TOPK_LOGPROBS], batch[schema.TOPK_IDS]  # (B, T, k) x2
    device = ids.device
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph outputs of the last step may be overwritten
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not torch.float32):
        if chunk:
            x, s_hidden = model.features(ids, groups=groups)  # (B, T, D), (B, T, G, D)
            ce, kd = losses.ce_kd_chunked(x, model.head, ids, t_lp, t_ids, temperature, kd_tail, chunk)
        else:
            logits, s_hidden = model(ids, groups=groups)  # (B, T, V), (B, T, G, D)
    if not chunk:
        ce = losses.ce_loss(logits, ids)
        kd = losses.kd_loss(logits, t_lp, t_ids, temperature, kd_tail)
    al = losses.align_loss(s_hidden, batch[schema.HIDDEN]) if groups else torch.zeros((), device=device)
    loss = (1 - alpha - beta) * ce + alpha * kd + beta * al
    scaler.scale(loss / grad_accum).backward()
    return {name: v.detach().float() for name, v in (("ce", ce), ("kd", kd), ("align", al), ("loss", loss))}


def optimizer_step(opt, scaler, params: list, grad_clip: float) -> torch.Tensor:
    """Unscale, clip, step, zero; returns the gradient norm before clipping (on the device)."""
    scaler.unscale_(opt)
    gn = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=False)  # in place: see make_student (CUDA graphs and accumulation)
    return gn


StepFn = Callable[[dict, Plan], None]


def distill(cfg: DistillConfig, on_start: Callable[[dict], None] | None = None,
            on_step: StepFn | None = None, warn: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) a student. The first SIGINT / SIGTERM ends the run at the next optimizer step with
    a checkpoint (Interrupted, resumable); a second one stops at once, keeping the last checkpoint. Every
    shard's sha256 is checked in a background thread while training reads it; no checkpoint or student is
    saved before its shards have passed."""
    with stop_on_signals(graceful=True) as stop:
        manifest = load_manifest(cfg.cache)
        hasher = ShardHasher(cfg.cache, manifest)
        try:
            return _distill(cfg, manifest, hasher, stop, on_start, on_step, warn or (lambda msg: None))
        finally:
            hasher.close()


def _distill(cfg: DistillConfig, manifest: Manifest, hasher: ShardHasher, stop, on_start, on_step,
             warn: Callable[[str], None]) -> dict:
    # 1. setup: everything that can be refused is refused before the first write
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    scfg = student_config(cfg, manifest)
    plan = plan_budget(cfg, manifest)
    if cfg.beta.start > 0 or cfg.beta.final > 0:
        if plan.groups == 0:
            raise TcacheError(
                f"{cfg.cache} has no hidden states but the alignment weight (--beta) is > 0; "
                "rebuild with --hidden-groups >= 1 or pass --beta 0"
            )
        if plan.groups > scfg.num_blocks:
            raise TcacheError(
                f"the cache has {plan.groups} hidden groups but the student only {scfg.num_blocks} blocks; "
                f"rebuild with --hidden-groups <= {scfg.num_blocks}, raise --blocks, or pass --beta 0"
            )
    budget = cap_gpu_memory(cfg.max_gpu_memory, device)
    mlstm_kernel, slstm_backend = resolve_kernels(scfg, device, budget)
    cuda = device.type == "cuda"
    workers = cfg.workers if cfg.workers >= 0 else (min(4, (os.cpu_count() or 2) // 2) if cuda else 0)
    chunk = resolve_loss_chunk(cfg.loss_chunk, device)
    teacher = _online_teacher(cfg, manifest, device) if cfg.online_teacher else None
    work = run_dir(cfg)
    identity = cache_identity(manifest)
    hasher.check()

    model, params, opt, scaler = make_student(cfg, scfg, mlstm_kernel, slstm_backend, device, amp_dtype)
    state, ckpt = RunState(), None
    if cfg.resume:
        ckpt, state = resume_from(work, cfg, model, opt, scaler, identity, warn)
    if stop.requested:
        raise Interrupted(stop.signum, "nothing was trained")
    work.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        _truncate_metrics(work / METRICS_FILE, state.step)
    (work / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))

    counts = model.param_counts()
    plan.info = {
        "params": counts, "mlstm_kernel": mlstm_kernel, "slstm_backend": slstm_backend,
        "device": str(device), "precision": str(amp_dtype).removeprefix("torch."),
        "blocks": scfg.num_blocks, "heads": scfg.num_heads, "slstm_at": scfg.slstm_at,
        "total_steps": plan.total_steps, "tokens_per_step": cfg.batch_size * cfg.grad_accum * plan.seq_len,
        "resumed_from_step": state.step if ckpt is not None else None, "hidden_groups": plan.groups,
        "loss_chunk": chunk, "workers": workers, "compile": resolve_compile(cfg.compile, device),
        "max_gpu_memory": cfg.max_gpu_memory,
    }
    if on_start:
        on_start(plan.info)

    # 2. fit
    rows = CacheRows(cfg.cache, with_hidden=plan.groups > 0, with_targets=teacher is None)
    model.train()
    metrics_f = open(work / METRICS_FILE, "a")
    # Loss sums stay on the device until a step is logged: a float() per micro-batch would make the CPU
    # wait for the GPU each time, and the next batch's host work would no longer overlap its compute.
    zero = torch.zeros((), device=device)
    sums = {"ce": zero, "kd": zero, "align": zero, "loss": zero}
    # Rate and elapsed time count from this (re)start; elapsed0 carries what a resumed run had before.
    t_start, tokens_start, elapsed0 = time.perf_counter(), state.tokens, state.elapsed
    last: dict = {}
    log = _MetricsLog(metrics_f, lambda r: on_step(r, plan) if on_step else None)
    try:
        while state.micro < plan.total_micro:
            epoch, j = divmod(state.micro, plan.micro_per_epoch)
            loader = epoch_loader(rows, cfg.batch_size, cfg.seed, epoch, j, workers, cuda)
            for batch in loader:
                k = j // cfg.grad_accum  # optimizer step within this epoch
                alpha = annealed(cfg.alpha, epoch, k)
                beta = annealed(cfg.beta, epoch, k)
                temp = annealed(cfg.temperature, epoch, k)
                batch = {n: t.to(device, non_blocking=True) for n, t in batch.items()}
                ids = batch[schema.INPUT_IDS]  # (B, T)
                if teacher is not None:
                    batch.update(_online_targets(teacher, ids, plan.groups))
                terms = forward_backward(model, batch, plan.groups, alpha, beta, temp, cfg.kd_tail, chunk, amp_dtype,
                                         scaler, cfg.grad_accum)
                for name, v in terms.items():
                    sums[name] = sums[name] + v / cfg.grad_accum
                state.micro += 1
                state.tokens += ids.numel()
                j += 1
                if state.micro % cfg.grad_accum == 0:
                    lr = lr_at(state.step, plan.total_steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    gn = optimizer_step(opt, scaler, params, cfg.grad_clip)
                    state.step += 1
                    now = time.perf_counter()
                    elapsed = elapsed0 + (now - t_start)
                    record = {"step": state.step, "epoch": epoch, "tokens": state.tokens,
                              "alpha": alpha, "beta": beta, "temperature": temp, "lr": lr,
                              "tokens_per_s": (state.tokens - tokens_start) / max(now - t_start, 1e-9),
                              "elapsed_s": elapsed}
                    values = {**sums, "grad_norm": gn}
                    if scaler.is_enabled():
                        # the scale tensor itself: get_scale() would read it now and wait for the GPU
                        values["loss_scale"] = getattr(scaler, "_get_scale_async", scaler.get_scale)()
                    last = log.put(record, values) or last
                    sums = dict.fromkeys(sums, zero)
                    hasher.check()  # a corrupt shard ends the run as soon as its hash is known
                    due = cfg.ckpt_every and state.step % cfg.ckpt_every == 0
                    if (due or stop.requested) and state.micro < plan.total_micro:
                        last = log.flush() or last
                        state.elapsed = elapsed
                        hasher.wait()  # a checkpoint holds only training on verified shards
                        ckpt = save_checkpoint(work, cfg, model, opt, scaler, state, identity)
                    if stop.requested and state.micro < plan.total_micro:
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

    # 3. save: the student directory, student.json last
    model.eval()
    meta = {
        "tcache_version": tcache.__version__,
        "cache": {"path": str(cfg.cache), "teacher": manifest.teacher.get("name_or_path"),
                  "tokenizer_sha256": manifest.tokenizer["sha256"], "seq_len": manifest.seq_len,
                  "top_k": manifest.top_k, "hidden_groups": plan.groups},
        "trained": {"steps": state.step, "tokens": state.tokens, "seconds": round(state.elapsed, 2)},
        "params": counts, "final_metrics": last, "kernels": {"mlstm": mlstm_kernel, "slstm": slstm_backend},
        "online_teacher": cfg.online_teacher,
    }
    if device.type == "cuda":
        meta["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    hasher.wait()
    save_student(work, model, meta, Path(cfg.cache) / schema.TEACHER_DIR)
    if work != Path(cfg.out):
        outdir.swap_in(work, Path(cfg.out), "run")
    return meta
