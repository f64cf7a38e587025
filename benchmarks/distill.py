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
  plain_lm_compiled_cudagraphs        the same with mode="reduce-overhead" (CUDA graphs); ratios are to the faster
                                      of the two compiled anchors (also at 2048)
  hybrid_stage1, hybrid_stage2        the library's Trainer on in-GPU cache rows, the recipe's defaults
  hybrid_stage2_fp16_16gib            the T4 path: --precision fp16 --max-gpu-memory 16GiB (checkpointing on)
  hybrid_stage2_fp16_16gib_budget0, ..._budget30   the same with --activation-budget 0 / 0.3 (torch.compile's
                                      partitioner recomputes instead of per-layer checkpointing; CUDA graphs)
  hybrid_stage2_compile_off, ..._dense_window, ..._mlstm_fp32   stage II with one change undone each: no compile;
                                      the dense (T, S + T) window mask (TCACHE_WINDOW=dense, compile off: the
                                      earlier default); fp32 mLSTM inputs (TCACHE_MLSTM_INPUTS=fp32)
  hybrid_stage2_kernel_fp32, _bf16    the mLSTM kernel computing in fp32 / bf16 (TCACHE_MLSTM_KERNEL_DTYPE; the
                                      default, auto, computes bf16 inputs in bf16: the same as _bf16 here)
  hybrid_stage2_full_logits           the defaults with --loss-chunk 0: full logits, no recomputed head GEMM
  hybrid_stage2_regions               the defaults with each decoder layer a nested compile region
                                      (TCACHE_COMPILE_SCOPE=regions): its warm-up is the cold compile time
  hybrid_stage2_on, ..._cudagraphs    --compile on (one inductor graph, no CUDA graphs) / cudagraphs, set explicitly
  v2_step                             the v2 student's training step (the library's defaults), for its MFU
  v2_step_whole                       the same with TCACHE_COMPILE_SCOPE=step: forward and losses one graph
  plain_lm_compiled_2048, hybrid_stage2_2048   the same at 8 x 2048, where the window's O(T·W) shows
MFU = 6 N tokens/s over the GPU's dense bf16 peak (N: all parameters; H100 / H200: 989 TFLOP/s).
--parts A,B runs only those, in that order; --prewarm N compiles every part first, N processes at a time, so the
timed pass reads torch.compile's disk caches (--prewarm-only: a first call, the timed one follows on the same
machine); --profile adds a profile of three more steps of each part, anchors too
(RESULTS/profile-PART.txt: kernels per step, GPU time by kernel kind, the top kernels; the summary in the JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from distill_steps import B, CUDA, T, cache_for, child_command, gpu_batches, run_distill, step_rate
from harness.env import describe, parser, workdirs
from harness.results import emit, failure, table, write_json
from harness.rows import run_result
from harness.timing import reset_peak
from shapes import make_teacher
from tcache.student.training.budget import plan_budget
from tcache.student.training.config import DistillConfig
from tcache.student.training.schedules import Anneal
from tcache.teachercache.manifest import load_manifest

RECIPE = {"smollm2-360m": "v2", "qwen2.5-1.5b": "v1", "tiny": "v1"}


def main() -> None:
    ap = parser(__doc__, ("train", "out"), work="/tmp/tcache-distill-bench")
    ap.add_argument("--tokenizer", required=True, help="a HF model dir whose tokenizer the random teachers use")
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
    ap.add_argument("--prewarm", type=int, default=0,
                    help="--hybrid: first compile every part N at a time (two steps each, untimed), so the timed pass "
                         "reads torch.compile's caches and fits one call; 0: off")
    ap.add_argument("--prewarm-only", action="store_true",
                    help="--hybrid --prewarm: only compile (a first call on a GPU machine whose caches a second, timed "
                         "call on the same machine then reads)")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one distill run, as JSON
    ap.add_argument("--hybrid-stage", default=None, help=argparse.SUPPRESS)  # internal: one hybrid stage, as JSON
    a = ap.parse_args()
    work, out = workdirs(a)
    teacher = make_teacher(a.shape, work / a.shape, a.tokenizer)
    t = time.perf_counter()
    cache = cache_for(a, teacher, work, T)
    build_s = time.perf_counter() - t
    base = DistillConfig(cache=str(cache), out=str(work / "run"), recipe=RECIPE[a.shape], steps=a.steps,
                         batch_size=B, grad_accum=1, precision="fp16" if CUDA else "fp32", alpha=Anneal(0.5, 0.5, 0.0),
                         beta=Anneal(0.1, 0.1, 0.0), temperature=Anneal(2.0, 2.0, 0.0))  # library defaults otherwise
    if a.single:  # one distill run in this fresh process
        emit(run_distill(replace(base, **json.loads(a.single)), min(5, a.steps - 1)))
        return
    if a.hybrid_stage or a.hybrid:
        from distill_hybrid import hybrid_bench, hybrid_part

        if a.hybrid_stage:  # one part of --hybrid in this fresh process (clean peak; a cap is per process)
            from harness import compile_cache

            spec = json.loads(a.hybrid_stage)
            try:  # a carried cache only saves time: its failure must not cost the measurement
                loaded = compile_cache.load(spec["name"])
            except Exception as e:
                loaded = failure(e)
            res = hybrid_part(a, spec, teacher, work)
            if "error" not in res:
                try:
                    res["compile_cache"] = {"loaded": loaded, "saved_bytes": compile_cache.save(spec["name"])}
                except Exception as e:
                    res["compile_cache"] = {"loaded": loaded, "saved": failure(e)}
            emit(res)
        else:
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
            record(res["step"], name, {"error": failure(e)})
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
        record(res, name, run_result(child_command(a, "--single", spec)))
    res.update(describe())
    if not a.accum:
        write_json(out / f"distill-{a.shape}.json", res)
    done = list(res["step"].items()) + [(k, res[k]) for k in res if k.startswith(("disk", "online"))]
    print("\n" + "\n".join(table([f"{a.shape} ({base.recipe})", "tokens/s", "peak GiB", "error"],
                                 [[n, f"{r.get('tokens_per_s', float('nan')):,.0f}", r.get("peak_gib"),
                                   r.get("error", "")] for n, r in done])))
    if a.accum:
        pairs = [(res["step"].get(n + ", accum 4"), res["step"].get(n + ", accum 1"))
                 for n in ("default (auto: cudagraphs)", "eager")] + [(res.get("disk, accum 4"), res.get("disk, accum 1"))]
        names = ("default step", "eager step", "distill from disk")
        res["accum4_over_accum1"] = {n: round(p4["tokens_per_s"] / p1["tokens_per_s"], 3) for n, (p4, p1) in
                                     zip(names, pairs) if p4 and p1 and "tokens_per_s" in p4 and "tokens_per_s" in p1}
        print("accumulation 4 / accumulation 1 tokens/s:", res["accum4_over_accum1"])
        write_json(out / f"distill-{a.shape}-accum.json", res)


if __name__ == "__main__":
    main()
