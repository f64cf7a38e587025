"""distill.py's measurements, in the process that runs them: the library's training step on batches already in GPU
memory (tokens/s, peak, a kernel profile), and `distill()` end to end from its metrics."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from harness.results import failure
from harness.timing import loop_seconds, peak_gib, reset_peak, sync
from tcache.student.training.config import DistillConfig
from tcache.student.training.data import CacheRows
from tcache.student.training.train import Trainer, distill, setup
from tcache.teachercache import schema
from tcache.teachercache.build import build
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.manifest import load_manifest
from tcache.text import DataSpec

B, T = 8, 512
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def time_steps(tr: Trainer, batches: list[dict], warmup: int, steps: int) -> tuple[float, float, Callable]:
    """(warm-up seconds, timed seconds, one-micro-batch fn) of the library's own training step (Trainer from
    setup(): forward, loss mix, backward, and an optimizer step after every grad_accum micro-batches)."""
    w = tr.weights(0, 0)

    def one(i: int) -> None:
        tr.micro_step(batches[i % len(batches)], w)
        if (i + 1) % tr.cfg.grad_accum == 0:
            tr.optimizer_step(tr.cfg.lr)

    return (*loop_seconds(one, warmup, steps), one)


def step_rate(cfg: DistillConfig, batches: list[dict], warmup: int, steps: int, profile: Path | None = None) -> dict:
    """tokens/s and peak memory of the training step on in-GPU batches; `warmup` and `steps` count
    micro-batches, with an optimizer step after every cfg.grad_accum of them."""
    reset_peak()
    tr = setup(cfg)
    warm_s, sec, one = time_steps(tr, batches, warmup, steps)
    info = tr.plan.info
    res = {"tokens_per_s": steps * B * T / sec, "peak_gib": peak_gib(),
           "warmup_s": round(warm_s, 1), "mlstm_kernel": info["mlstm_kernel"], "slstm_backend": info["slstm_backend"],
           "loss_chunk": info["loss_chunk"], "compile": info["compile"], "grad_accum": cfg.grad_accum,
           "params": info["params"]}
    if profile is not None:
        res["profile"] = profile_steps(one, profile)
    return res


KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "splitk", "cublas")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("mlstm", ("mlstm", "chunkwise", "_recurrent_", "_parallel_")),
    ("inductor", ("triton_",)),
    ("copy/fill", ("memcpy", "memset", "copy", "fill")),
    ("reduce", ("reduce", "softmax", "norm")),
    ("pointwise", ("elementwise", "vectorized", "unrolled")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_steps(one: Callable, path: Path, steps: int = 3, top: int = 30) -> dict:
    """Profile `steps` micro-steps (after the timed ones, so compiled and warm): per step, the kernel count, the GPU
    time and its split by kernel kind; `path` gets the top kernels and torch.profiler's operator table."""
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        for i in range(steps):
            one(i)
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    # every kernel launch (and memcpy/memset); not the GPU-side ranges of user annotations ("Optimizer.step#AdamW.step"
    # spans the optimizer's kernels: counted, it added their time twice, ~3 ms a stage II step, and one "kernel")
    kernels = [e for e in p.events() if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
    per: dict[str, list] = {}
    for e in kernels:
        n, t = per.setdefault(e.name, [0, 0.0])
        per[e.name] = [n + 1, t + e.device_time_total / 1e3]  # us -> ms
    gpu_ms = sum(t for _, t in per.values()) / steps
    kinds: dict[str, float] = {}
    for name, (_, t) in per.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + t / steps
    summary = {"kernels_per_step": round(len(kernels) / steps), "gpu_ms_per_step": round(gpu_ms, 2),
               "wall_ms_per_step": round(wall_ms, 2),
               "ms_by_kind": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}
    lines = [json.dumps(summary), "", f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  kernel"]
    for name, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{t / steps:8.3f} {t / steps / max(gpu_ms, 1e-9):6.1%} {n / steps:10.1f}  {name[:150]}")
    lines += ["", p.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)]
    path.write_text("\n".join(lines) + "\n")
    return summary



def gpu_batches(cache: str, groups: int, n: int) -> list[dict]:
    rows = CacheRows(cache, with_hidden=groups > 0)
    out = []
    for b in range(n):
        items = [rows[b * B + i] for i in range(B)]
        out.append({k: torch.stack([it[k] for it in items]).to(DEVICE) for k in items[0]})
    return out


def run_distill(cfg: DistillConfig, warmup: int) -> dict:
    """`distill()` end to end; the rate over the steps after `warmup` from its metrics."""
    shutil.rmtree(cfg.out, ignore_errors=True)
    reset_peak()
    try:
        targets = None
        if cfg.online_teacher:  # as `tcache distill --online-teacher` wires it
            from tcache.teachercache.online import online_targets

            targets = online_targets(cfg.online_teacher, load_manifest(cfg.cache), DEVICE)
        meta = distill(cfg, targets=targets)
    except Exception as e:  # an out-of-memory under the cap is a result, not a crash
        res = {"error": failure(e), "peak_gib": peak_gib()}
        reset_peak()
        return res
    m = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    a, b = m[warmup - 1], m[-1]
    reset_peak()
    return {"tokens_per_s": (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]),
            "peak_gib": meta.get("peak_gpu_memory_gib"), "steps": b["step"], "final_loss": b["loss"],
            "kernels": meta.get("kernels")}


def cache_for(a, teacher: Path, work: Path, T: int) -> Path:
    """The random teacher's cache at sequence length T (built once)."""
    cache = work / (f"cache-{a.shape}" + ("" if T == 512 else f"-{T}"))
    if not (cache / schema.MANIFEST_FILE).exists():
        build(BuildConfig(teacher=str(teacher), data=DataSpec(a.train), out=str(cache), tokens=(a.steps + 2) * B * T,
                          seq_len=T, top_k=64, overwrite=True))
    return cache


def child_command(a, flag: str, spec: dict) -> list[str]:
    """distill.py run again in a fresh process (a clean peak; a memory cap is per process) for one measurement:
    `flag` (--single, --hybrid-stage) with its JSON spec, and this run's shape, data and paths."""
    return [sys.executable, str(Path(__file__).with_name("distill.py")), "--tokenizer", a.tokenizer, "--train",
            a.train, "--out", a.out, "--work", a.work, "--shape", a.shape, "--steps", str(a.steps), flag,
            json.dumps(spec)]
