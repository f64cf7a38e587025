"""Distillation speed and memory at the seeds' scale, side by side in one run.

    python benchmarks/distill.py --tokenizer TEACHER_DIR --train TRAIN.jsonl.xz --out RESULTS \
        [--shape smollm2-360m|qwen2.5-1.5b] [--variants] [--profile]

A random-weight teacher of the shape (benchmarks/shapes.py) builds a small cache with `tcache build`;
the student is the recipe's (smollm2-360m: v2, 32 mLSTM blocks, D 960, 16 heads; qwen2.5-1.5b: v1, 14
alternating sLSTM/mLSTM blocks, D 1536) trained on CE + top-64 KD + alignment (alpha 0.5, beta 0.1),
fp16 autocast, batch 8 x 512, no accumulation. Measured, in this order, one at a time on the GPU:
  step      the library's training step (setup() -> Trainer.micro_step + optimizer_step) on batches
            already in GPU memory;
            with --variants: today's path (parallel mLSTM, full logits), the fused chunked CE+KD, the
            Triton chunkwise mLSTM kernel, torch.compile of the blocks (with CUDA graphs)
  disk      `distill()` reading the on-disk cache (loader workers, pinned memory), the step's settings
  online    `distill()` with the teacher on the GPU computing the targets of every batch
  capped    disk and online again under --max-gpu-memory (a 16 GB card's budget)
disk, online and capped each run in a fresh process (clean peaks; a cap is per process). tokens/s over
the steps after the warm-up; peak = torch.cuda.max_memory_allocated, reset before each.

    python benchmarks/distill.py --hybrid --tokenizer TEACHER_DIR --train TRAIN.jsonl.xz --out RESULTS [--budget S]

The hybrid recipe's step against its anchor (issue 23), each part in a fresh process, written to
RESULTS/distill-hybrid-SHAPE.json under these keys (each with tokens_per_s, peak_gib, mfu):
  plain_lm_eager, plain_lm_compiled   the teacher's own architecture trained as a plain LM: transformers' forward
                                      (SDPA), CE, fused AdamW, bf16 autocast; eager, then torch.compile(model)
  hybrid_stage1, hybrid_stage2        the library's Trainer on in-GPU cache rows, the recipe's defaults
  hybrid_stage2_fp16_16gib            the T4 path: --precision fp16 --max-gpu-memory 16GiB (checkpointing on)
  hybrid_stage2_compile_off, ..._dense_window, ..._mlstm_fp32   stage II with one change undone each: no compile;
                                      the dense (T, S + T) window mask (TCACHE_WINDOW=dense, compile off: the
                                      earlier default); fp32 mLSTM inputs (TCACHE_MLSTM_INPUTS=fp32)
  v2_step                             the v2 student's training step (the library's defaults), for its MFU
  plain_lm_compiled_2048, hybrid_stage2_2048   the same at 8 x 2048, where the window's O(T·W) shows
MFU = 6 N tokens/s over the GPU's dense bf16 peak (N: all parameters; H100 / H200: 989 TFLOP/s).
--parts A,B runs only those, in that order; --profile adds a profile of three more steps of each student part
(RESULTS/profile-PART.txt: kernels per step, GPU time by kernel kind, the top kernels; the summary in the JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shapes import make_teacher  # noqa: E402
from tcache.student.training.data import CacheRows  # noqa: E402
from tcache.student.training.budget import plan_budget  # noqa: E402
from tcache.student.training.config import DistillConfig  # noqa: E402
from tcache.student.training.schedules import Anneal  # noqa: E402
from tcache.student.training.train import Trainer, distill, setup  # noqa: E402
from tcache.teachercache import schema  # noqa: E402
from tcache.teachercache.manifest import load_manifest  # noqa: E402
from tcache.teachercache.config import BuildConfig  # noqa: E402
from tcache.teachercache.build import build  # noqa: E402
from tcache.text import DataSpec  # noqa: E402

B, T = 8, 512
RECIPE = {"smollm2-360m": "v2", "qwen2.5-1.5b": "v1", "tiny": "v1"}
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
AMP = torch.float16 if CUDA else torch.float32  # CPU: a smoke test of the script only (--shape tiny)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak() -> float:
    return gib(torch.cuda.max_memory_allocated()) if CUDA else float("nan")


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def time_steps(tr: Trainer, batches: list[dict], warmup: int, steps: int) -> tuple[float, float, Callable]:
    """(warm-up seconds, timed seconds, one-micro-batch fn) of the library's own training step (Trainer from
    setup(): forward, loss mix, backward, and an optimizer step after every grad_accum micro-batches)."""
    w = tr.weights(0, 0)

    def one(i: int) -> None:
        tr.micro_step(batches[i % len(batches)], w)
        if (i + 1) % tr.cfg.grad_accum == 0:
            tr.optimizer_step(tr.cfg.lr)

    t0 = time.perf_counter()
    for i in range(warmup):
        one(i)
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        one(i)
    sync()
    return warm_s, time.perf_counter() - t0, one


def step_rate(cfg: DistillConfig, batches: list[dict], warmup: int, steps: int, profile: Path | None = None) -> dict:
    """tokens/s and peak memory of the training step on in-GPU batches; `warmup` and `steps` count
    micro-batches, with an optimizer step after every cfg.grad_accum of them."""
    reset_peak()
    tr = setup(cfg)
    warm_s, sec, one = time_steps(tr, batches, warmup, steps)
    info = tr.plan.info
    res = {"tokens_per_s": steps * B * T / sec, "peak_gib": peak(),
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
    kernels = [e for e in p.events() if e.device_type.name == "CUDA"]  # every kernel launch (and memcpy/memset)
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


def hybrid_stage_rate(cfg: DistillConfig, stage: int, warmup: int = 3, steps: int = 10,
                      profile: Path | None = None) -> dict:
    """tokens/s and peak memory of one stage of the hybrid recipe's step (the library's Trainer), on cache rows
    already on the device; with `profile`, a profile of three more steps written there (profile_steps)."""
    reset_peak()
    try:
        tr = setup(cfg)
        tr.begin_stage(tr.plan.stages[stage])
        batches = gpu_batches(cfg.cache, 0, 4)
        _, sec, one = time_steps(tr, batches, warmup, steps)
    except Exception as e:  # an out-of-memory under the cap is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "peak_gib": peak()}
    T = batches[0][schema.INPUT_IDS].shape[1]
    res = {"tokens_per_s": steps * B * T / sec, "peak_gib": peak(), "precision": tr.plan.info["precision"],
           "compile": tr.plan.info["compile"], "T": T,
           "mlstm_kernel": tr.plan.info["mlstm_kernel"], "checkpointing": tr.plan.info["checkpointing"],
           "params": tr.model.param_counts()}
    if profile is not None:
        res["profile"] = profile_steps(one, profile)
    return res


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
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "peak_gib": peak()}
        reset_peak()
        return res
    m = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    a, b = m[warmup - 1], m[-1]
    reset_peak()
    return {"tokens_per_s": (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]),
            "peak_gib": meta.get("peak_gpu_memory_gib"), "steps": b["step"], "final_loss": b["loss"],
            "kernels": meta.get("kernels")}


PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "T4": 65.0}
"""Dense bf16 (T4: fp16) tensor-core peak per GPU name, TFLOP/s."""

HYBRID_PARTS = {  # name: spec, in the order they run (the anchor and the defaults first)
    "plain_lm_compiled": {"kind": "plain", "compiled": True},
    "hybrid_stage2": {"kind": "hybrid", "stage": 1},
    "hybrid_stage1": {"kind": "hybrid", "stage": 0},
    "hybrid_stage2_fp16_16gib": {"kind": "hybrid", "stage": 1, "precision": "fp16", "cap": "16GiB"},
    "plain_lm_eager": {"kind": "plain", "compiled": False},
    "hybrid_stage2_compile_off": {"kind": "hybrid", "stage": 1, "compile": "off"},
    "hybrid_stage2_dense_window": {"kind": "hybrid", "stage": 1, "compile": "off", "env": {"TCACHE_WINDOW": "dense"}},
    "hybrid_stage2_mlstm_fp32": {"kind": "hybrid", "stage": 1, "env": {"TCACHE_MLSTM_INPUTS": "fp32"}},
    "v2_step": {"kind": "v2"},
    "plain_lm_compiled_2048": {"kind": "plain", "compiled": True, "T": 2048},
    "hybrid_stage2_2048": {"kind": "hybrid", "stage": 1, "T": 2048},
}
PART_MIN_S = 60.0
"""A part is not started with less of --budget left than this."""


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if CUDA else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def with_mfu(res: dict, params: int) -> dict:
    if "tokens_per_s" in res and peak_tflops():
        res["mfu"] = round(6 * params * res["tokens_per_s"] / (peak_tflops() * 1e12), 4)
    return res


def cache_for(a, teacher: Path, work: Path, T: int) -> Path:
    """The random teacher's cache at sequence length T (built once)."""
    cache = work / (f"cache-{a.shape}" + ("" if T == 512 else f"-{T}"))
    if not (cache / schema.MANIFEST_FILE).exists():
        build(BuildConfig(teacher=str(teacher), data=DataSpec(a.train), out=str(cache), tokens=(a.steps + 2) * B * T,
                          seq_len=T, top_k=64, overwrite=True))
    return cache


def plain_lm_rate(teacher: Path, T: int, compiled: bool, warmup: int = 3, steps: int = 10) -> dict:
    """The anchor: the teacher's architecture as a plain causal LM, as one trains it with transformers: its forward
    with SDPA attention and its CE loss (labels), fused AdamW, bf16 autocast; torch.compile(model) when compiled."""
    from transformers import AutoModelForCausalLM

    reset_peak()
    lm = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, attn_implementation="sdpa").to(DEVICE)
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, fused=CUDA)
    fwd = torch.compile(lm) if compiled else lm
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, lm.config.vocab_size, (B, T), generator=g).to(DEVICE) for _ in range(4)]

    def one(i: int) -> None:
        ids = batches[i % len(batches)]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(warmup):
        one(i)
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        one(i)
    sync()
    params = sum(p.numel() for p in lm.parameters())
    return with_mfu({"tokens_per_s": steps * B * T / (time.perf_counter() - t0), "peak_gib": peak(),
                     "warmup_s": round(warm, 1), "params": params, "compiled": compiled}, params)


def hybrid_part(a, spec: dict, teacher: Path, work: Path) -> dict:
    """One part of --hybrid (HYBRID_PARTS), in this process."""
    T = spec.get("T", 512)
    try:
        if spec["kind"] == "plain":
            return plain_lm_rate(teacher, T, spec["compiled"])
        cache = str(cache_for(a, teacher, work, T))
        if spec["kind"] == "v2":
            cfg = DistillConfig(cache=cache, out=str(work / "v2"), recipe="v2", steps=a.steps, batch_size=B,
                                grad_accum=1)
            prof = Path(a.out) / f"profile-{spec['name']}.txt" if spec.get("profile") else None
            res = step_rate(cfg, gpu_batches(cache, plan_budget(cfg, load_manifest(cache)).groups, 4), 3, 10, prof)
            return with_mfu(res, res["params"]["total"] if isinstance(res["params"], dict) else res["params"])
        cfg = DistillConfig(cache=cache, out=str(work / "hybrid"), recipe="hybrid", steps=a.steps, batch_size=B,
                            grad_accum=1, precision=spec.get("precision", "auto"), max_gpu_memory=spec.get("cap"),
                            compile=spec.get("compile", "auto"))
        prof = Path(a.out) / f"profile-{spec['name']}.txt" if spec.get("profile") else None
        res = hybrid_stage_rate(cfg, spec["stage"], profile=prof)
        return with_mfu(res, res["params"]["total"]) if "params" in res else res
    except Exception as e:  # an out-of-memory under the cap is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "peak_gib": peak()}


def hybrid_bench(a, teacher: Path, out: Path) -> None:
    """Every HYBRID_PARTS entry in its own process, inside --budget; the JSON and a table with each part's ratio
    to plain_lm_compiled."""
    import os

    res = {"shape": a.shape, "batch": B, "device": torch.cuda.get_device_name() if CUDA else "cpu",
           "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "peak_tflops": peak_tflops()}
    t_end = time.monotonic() + a.budget if a.budget > 0 else None
    names = a.parts.split(",") if a.parts else list(HYBRID_PARTS)
    unknown = [n for n in names if n not in HYBRID_PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(HYBRID_PARTS)}")
    parts = {n: HYBRID_PARTS[n] for n in names}  # in the order given
    for name, spec in parts.items():
        spec = {**spec, "name": name, "profile": a.profile and spec["kind"] != "plain"}
        left = None if t_end is None else t_end - time.monotonic()
        if left is not None and left < PART_MIN_S:
            res[name] = {"error": f"not run: {left:.0f} s of --budget left"}
            continue
        cmd = [sys.executable, __file__, "--tokenizer", a.tokenizer, "--train", a.train, "--out", a.out, "--work",
               a.work, "--shape", a.shape, "--steps", str(a.steps), "--hybrid-stage", json.dumps(spec)]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left,
                               env={**os.environ, **spec.get("env", {})})
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            res[name] = (json.loads(lines[-1][7:]) if lines else
                         {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]})
        except subprocess.TimeoutExpired:
            res[name] = {"error": "not run: out of --budget"}
        res[name]["wall_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps({name: res[name]}), flush=True)
        (out / f"distill-hybrid-{a.shape}.json").write_text(json.dumps(res, indent=2))
    anchor = res.get("plain_lm_compiled", {}).get("tokens_per_s")
    for name in parts:
        r = res[name]
        if anchor and "tokens_per_s" in r:
            ref = res.get("plain_lm_compiled_2048", {}).get("tokens_per_s") if name.endswith("_2048") else anchor
            r["x_plain_lm_compiled"] = round(r["tokens_per_s"] / ref, 3) if ref else None
    (out / f"distill-hybrid-{a.shape}.json").write_text(json.dumps(res, indent=2))
    print(f"\n| {a.shape}, batch {B} | tokens/s | x plain LM compiled | MFU | peak GiB |\n|---|---|---|---|---|")
    for name in parts:
        r = res[name]
        print(f"| {name} | {r.get('tokens_per_s', float('nan')):,.0f} | {r.get('x_plain_lm_compiled', '-')} | "
              f"{r.get('mfu', '-')} | {r.get('peak_gib', '-')} | {r.get('error', '')}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="a HF model dir whose tokenizer the random teachers use")
    ap.add_argument("--train", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/tcache-distill-bench")
    ap.add_argument("--shape", default="smollm2-360m", choices=sorted(RECIPE))
    ap.add_argument("--variants", action="store_true", help="also time the step variants")
    ap.add_argument("--profile", action="store_true", help="write profiler tables of the step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cap", default="16GiB")
    ap.add_argument("--only", default=None, help="with --variants: those whose name contains this")
    ap.add_argument("--accum", action="store_true",
                    help="gradient accumulation 1 vs 4 (the recipes' default) side by side: the default step, the "
                         "eager step, and distill from disk")
    ap.add_argument("--hybrid", action="store_true",
                    help="the hybrid recipe's stage I and stage II steps: defaults (auto precision, no cap) and fp16 "
                         "under --cap, each stage in a fresh process")
    ap.add_argument("--budget", type=float, default=0, help="--hybrid: seconds for all parts (0: no limit)")
    ap.add_argument("--parts", default=None,
                    help="--hybrid: only these parts, in this order (comma-separated HYBRID_PARTS names)")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one distill run, as JSON
    ap.add_argument("--hybrid-stage", default=None, help=argparse.SUPPRESS)  # internal: one hybrid stage, as JSON
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(a.shape, work / a.shape, a.tokenizer)
    cache = work / f"cache-{a.shape}"
    rows = (a.steps + 2) * B
    t = time.perf_counter()
    if not (cache / schema.MANIFEST_FILE).exists():
        build(BuildConfig(teacher=str(teacher), data=DataSpec(a.train), out=str(cache), tokens=rows * T, seq_len=T,
                          top_k=64, overwrite=True))
    build_s = time.perf_counter() - t
    base = DistillConfig(cache=str(cache), out=str(work / "run"), recipe=RECIPE[a.shape], steps=a.steps,
                         batch_size=B, grad_accum=1, precision="fp16" if CUDA else "fp32", alpha=Anneal(0.5, 0.5, 0.0),
                         beta=Anneal(0.1, 0.1, 0.0), temperature=Anneal(2.0, 2.0, 0.0))  # library defaults otherwise
    if a.single:  # one distill run in this fresh process
        print("RESULT " + json.dumps(run_distill(replace(base, **json.loads(a.single)), min(5, a.steps - 1))))
        return
    if a.hybrid_stage:  # one part of --hybrid in this fresh process (clean peak; a cap is per process)
        print("RESULT " + json.dumps(hybrid_part(a, json.loads(a.hybrid_stage), teacher, work)))
        return
    if a.hybrid:
        hybrid_bench(a, teacher, out)
        return
    groups = plan_budget(base, load_manifest(cache)).groups
    batches = gpu_batches(str(cache), groups, 4)
    res: dict = {"shape": a.shape, "recipe": base.recipe, "batch": [B, T], "precision": "fp16",
                 "build_s": round(build_s, 1), "step": {}}

    def record(section: dict, name: str, value: dict) -> None:
        section[name] = value
        print(json.dumps({name: value}), flush=True)

    variants = {"default": base}
    if a.variants:
        par, tri = "parallel", "chunkwise--triton_xl_chunk"
        variants = {
            "today: parallel mLSTM, full logits, eager": replace(base, loss_chunk=0, mlstm_kernel=par, compile="off"),
            "parallel, full logits, compiled": replace(base, loss_chunk=0, mlstm_kernel=par, compile="on"),
            "parallel, full logits, cudagraphs": replace(base, loss_chunk=0, mlstm_kernel=par, compile="cudagraphs"),
            "parallel, chunked CE+KD, cudagraphs (default)": replace(base, mlstm_kernel=par, compile="cudagraphs"),
            "triton_xl_chunk, full logits, cudagraphs": replace(base, loss_chunk=0, mlstm_kernel=tri,
                                                                compile="cudagraphs"),
            "triton_xl_chunk, chunked CE+KD, cudagraphs": replace(base, mlstm_kernel=tri, compile="cudagraphs"),
            "triton_xl_chunk, chunked CE+KD, eager (a T4's choice)": replace(base, mlstm_kernel=tri, compile="off"),
        }
        variants = {n: v for n, v in variants.items() if a.only is None or a.only in n}
    if a.accum:
        variants = {"default (auto: cudagraphs), accum 1": base,
                    "default (auto: cudagraphs), accum 4": replace(base, grad_accum=4),
                    "eager, accum 1": replace(base, compile="off"),
                    "eager, accum 4": replace(base, compile="off", grad_accum=4)}
    for i, (name, cfg) in enumerate(variants.items()):
        prof = out / f"profile-{a.shape}-{i}.txt" if a.profile else None
        try:
            record(res["step"], name, step_rate(cfg, batches, warmup=8 if a.accum else 3,
                                                 steps=16 if a.accum else 10, profile=prof))
            reset_peak()
        except Exception as e:
            record(res["step"], name, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            torch.cuda.empty_cache()
    ok = {n: r for n, r in res["step"].items() if "tokens_per_s" in r}
    best_name = max(ok, key=lambda n: ok[n]["tokens_per_s"])
    best = variants[best_name]
    res["best_step"] = best_name
    del batches
    reset_peak()
    runs = {"disk": {}, "online": {"online_teacher": str(teacher)}}
    if a.accum:  # the same tokens per run: a quarter of the optimizer steps at accumulation 4
        runs = {"disk, accum 1": {}, "disk, accum 4": {"grad_accum": 4, "steps": max(a.steps // 4, 6)}}
    # under the cap, the library's automatic choices (which consult the cap), as a T4 user would run
    capped = {f"disk, capped {a.cap}": {"max_gpu_memory": a.cap},
              f"online, capped {a.cap}": {"online_teacher": str(teacher), "max_gpu_memory": a.cap}} if CUDA else {}
    if a.accum:
        capped = {}
    for name, extra in {**runs, **capped}.items():
        spec = {"out": str(work / name.replace(", ", "-").replace(" ", "-")), **extra}
        if name in runs:
            spec.update(mlstm_kernel=best.mlstm_kernel, loss_chunk=best.loss_chunk, compile=best.compile)
        cmd = [sys.executable, __file__, "--tokenizer", a.tokenizer, "--train", a.train, "--out", a.out,
               "--work", a.work, "--shape", a.shape, "--steps", str(a.steps), "--single", json.dumps(spec)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        value = json.loads(lines[-1][7:]) if lines else {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
        record(res, name, value)
    res["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    res["torch"], res["command"] = torch.__version__, " ".join(sys.argv)
    if not a.accum:
        (out / f"distill-{a.shape}.json").write_text(json.dumps(res, indent=2))
    print(f"\n| {a.shape} ({base.recipe}) | tokens/s | peak GiB |\n|---|---|---|")
    for name, r in list(res["step"].items()) + [(k, res[k]) for k in res if k.startswith(("disk", "online"))]:
        print(f"| {name} | {r.get('tokens_per_s', float('nan')):,.0f} | {r.get('peak_gib')} | {r.get('error', '')}")
    if a.accum:
        pairs = [(res["step"].get(n + ", accum 4"), res["step"].get(n + ", accum 1"))
                 for n in ("default (auto: cudagraphs)", "eager")] + [(res.get("disk, accum 4"), res.get("disk, accum 1"))]
        names = ("default step", "eager step", "distill from disk")
        res["accum4_over_accum1"] = {n: round(p4["tokens_per_s"] / p1["tokens_per_s"], 3) for n, (p4, p1) in
                                     zip(names, pairs) if p4 and p1 and "tokens_per_s" in p4 and "tokens_per_s" in p1}
        print("accumulation 4 / accumulation 1 tokens/s:", res["accum4_over_accum1"])
        (out / f"distill-{a.shape}-accum.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
