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
from tcache.student.data import CacheRows  # noqa: E402
from tcache.student.budget import plan_budget  # noqa: E402
from tcache.student.config import DistillConfig  # noqa: E402
from tcache.student.schedules import Anneal  # noqa: E402
from tcache.student.train import Trainer, distill, setup  # noqa: E402
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
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for i in range(3):
                one(i)
            sync()
        profile.write_text(p.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    return res


def hybrid_stage_rate(cfg: DistillConfig, stage: int, warmup: int = 3, steps: int = 10) -> dict:
    """tokens/s and peak memory of one stage of the hybrid recipe's step (the library's Trainer), on cache rows
    already on the device."""
    reset_peak()
    try:
        tr = setup(cfg)
        tr.begin_stage(tr.plan.stages[stage])
        _, sec, _ = time_steps(tr, gpu_batches(cfg.cache, 0, 4), warmup, steps)
    except Exception as e:  # an out-of-memory under the cap is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "peak_gib": peak()}
    return {"tokens_per_s": steps * B * T / sec, "peak_gib": peak(), "precision": tr.plan.info["precision"],
            "mlstm_kernel": tr.plan.info["mlstm_kernel"], "checkpointing": tr.plan.info["checkpointing"],
            "params": tr.model.param_counts()}


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
    if a.hybrid_stage:  # one hybrid stage's step in this fresh process (clean peak; a cap is per process)
        spec = json.loads(a.hybrid_stage)
        cfg = DistillConfig(cache=str(cache), out=str(work / "hybrid"), recipe="hybrid", steps=a.steps,
                            batch_size=B, grad_accum=1, precision=spec["precision"], max_gpu_memory=spec["cap"])
        print("RESULT " + json.dumps(hybrid_stage_rate(cfg, spec["stage"])))
        return
    if a.hybrid:
        res = {"shape": a.shape, "recipe": "hybrid", "batch": [B, T], "step": {}}
        for prec, cap in (("auto", None), ("fp16", a.cap)):
            for stage in (0, 1):
                name = f"stage {'I' if stage == 0 else 'II'}, precision {prec}" + (f", capped {cap}" if cap else "")
                cmd = [sys.executable, __file__, "--tokenizer", a.tokenizer, "--train", a.train, "--out", a.out,
                       "--work", a.work, "--shape", a.shape, "--steps", str(a.steps),
                       "--hybrid-stage", json.dumps({"stage": stage, "precision": prec, "cap": cap})]
                p = subprocess.run(cmd, capture_output=True, text=True)
                lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                res["step"][name] = (json.loads(lines[-1][7:]) if lines else
                                     {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]})
                print(json.dumps({name: res["step"][name]}), flush=True)
        res["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
        res["torch"], res["command"] = torch.__version__, " ".join(sys.argv)
        (out / f"distill-hybrid-{a.shape}.json").write_text(json.dumps(res, indent=2))
        print(f"\n| {a.shape} hybrid step | tokens/s | peak GiB |\n|---|---|---|")
        for name, r in res["step"].items():
            print(f"| {name} | {r.get('tokens_per_s', float('nan')):,.0f} | {r.get('peak_gib')} | {r.get('error', '')}")
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
