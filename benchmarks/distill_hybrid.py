"""distill.py --hybrid: the hybrid recipe's training step against its anchor, the teacher's architecture trained as a
plain LM (issue 23): each part of HYBRID_PARTS in a process of its own, inside --budget, with its MFU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from distill_steps import B, CUDA, DEVICE, cache_for, child_command, gpu_batches, profile_steps, step_rate, time_steps
from harness.env import child_env, describe
from harness.results import failure, table, write_json
from harness.rows import Budget, run_result
from harness.timing import loop_seconds, peak_gib, reset_peak
from tcache.student.training.budget import plan_budget
from tcache.student.training.config import DistillConfig
from tcache.student.training.train import setup
from tcache.teachercache import schema
from tcache.teachercache.manifest import load_manifest

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "T4": 65.0}
"""Dense bf16 (T4: fp16) tensor-core peak per GPU name, TFLOP/s."""

BEFORE = {"TCACHE_MLSTM_OP": "0", "TCACHE_COMPILE_SCOPE": "layer"}
"""The step as it was before issue 32: each decoder layer compiled alone, the mLSTM kernel through mlstm_kernels'
autograd Function (a graph break at every call). The defaults now: the kernel a custom op, the whole step one graph."""
HYBRID_PARTS = {  # name: spec, in the order they run (the anchor, the defaults and the step before first)
    "plain_lm_compiled": {"kind": "plain", "compiled": True},
    "plain_lm_compiled_cudagraphs": {"kind": "plain", "compiled": "reduce-overhead"},
    "hybrid_stage2": {"kind": "hybrid", "stage": 1},
    "hybrid_stage2_before": {"kind": "hybrid", "stage": 1, "env": BEFORE},
    "hybrid_stage2_cudagraphs": {"kind": "hybrid", "stage": 1, "compile": "cudagraphs"},
    "hybrid_stage1": {"kind": "hybrid", "stage": 0},
    "hybrid_stage1_cudagraphs": {"kind": "hybrid", "stage": 0, "compile": "cudagraphs"},
    "hybrid_stage1_before": {"kind": "hybrid", "stage": 0, "env": BEFORE},
    # each decoder layer one nested compile region of the step's graph: compiled once (warmup_s), stamped out per layer
    "hybrid_stage2_regions": {"kind": "hybrid", "stage": 1, "env": {"TCACHE_COMPILE_SCOPE": "regions"}},
    "hybrid_stage2_op_layer": {"kind": "hybrid", "stage": 1, "env": {"TCACHE_COMPILE_SCOPE": "layer"}},
    "hybrid_stage2_layer_cudagraphs": {"kind": "hybrid", "stage": 1, "compile": "cudagraphs",
                                       "env": {"TCACHE_COMPILE_SCOPE": "layer"}},
    "hybrid_stage2_kernel_bf16": {"kind": "hybrid", "stage": 1, "env": {"TCACHE_MLSTM_KERNEL_DTYPE": "bf16"}},
    "hybrid_stage2_kernel_fp32": {"kind": "hybrid", "stage": 1, "env": {"TCACHE_MLSTM_KERNEL_DTYPE": "fp32"}},
    "hybrid_stage2_kernel_bf16_cudagraphs": {"kind": "hybrid", "stage": 1, "compile": "cudagraphs",
                                             "env": {"TCACHE_MLSTM_KERNEL_DTYPE": "bf16"}},
    "hybrid_stage2_on": {"kind": "hybrid", "stage": 1, "compile": "on"},
    "hybrid_stage2_2048_cudagraphs": {"kind": "hybrid", "stage": 1, "T": 2048, "compile": "cudagraphs"},
    "hybrid_stage2_flex_window": {"kind": "hybrid", "stage": 1, "env": {"TCACHE_WINDOW": "flex"}},
    # the CE + KD over full logits (--loss-chunk 0): no recomputed head GEMM per chunk, the (B, T, V) logits kept
    "hybrid_stage2_full_logits": {"kind": "hybrid", "stage": 1, "loss_chunk": 0},
    "hybrid_stage2_fp16_16gib": {"kind": "hybrid", "stage": 1, "precision": "fp16", "cap": "16GiB"},
    "hybrid_stage2_fp16_16gib_cudagraphs": {"kind": "hybrid", "stage": 1, "precision": "fp16", "cap": "16GiB",
                                            "compile": "cudagraphs"},
    # the T4 path with torch.compile's activation memory budget in place of per-layer checkpointing (CUDA graphs)
    "hybrid_stage2_fp16_16gib_budget0": {"kind": "hybrid", "stage": 1, "precision": "fp16", "cap": "16GiB",
                                         "activation_budget": 0.0},
    "hybrid_stage2_fp16_16gib_budget30": {"kind": "hybrid", "stage": 1, "precision": "fp16", "cap": "16GiB",
                                          "activation_budget": 0.3},
    "hybrid_stage2_fp16_16gib_before": {"kind": "hybrid", "stage": 1, "precision": "fp16", "cap": "16GiB",
                                        "env": BEFORE},
    "plain_lm_eager": {"kind": "plain", "compiled": False},
    "hybrid_stage2_compile_off": {"kind": "hybrid", "stage": 1, "compile": "off"},
    "hybrid_stage2_dense_window": {"kind": "hybrid", "stage": 1, "compile": "off", "env": {"TCACHE_WINDOW": "dense"}},
    "hybrid_stage2_mlstm_fp32": {"kind": "hybrid", "stage": 1, "env": {"TCACHE_MLSTM_INPUTS": "fp32"}},
    "v2_step": {"kind": "v2"},
    "v2_step_whole": {"kind": "v2", "env": {"TCACHE_COMPILE_SCOPE": "step"}},
    "plain_lm_compiled_2048": {"kind": "plain", "compiled": True, "T": 2048},
    "plain_lm_compiled_2048_cudagraphs": {"kind": "plain", "compiled": "reduce-overhead", "T": 2048},
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


def plain_lm_rate(teacher: Path, T: int, compiled: bool | str, warmup: int = 3, steps: int = 10,
                  profile: Path | None = None) -> dict:
    """The anchor: the teacher's architecture as a plain causal LM, as one trains it with transformers: its forward
    with SDPA attention and its CE loss (labels), fused AdamW, bf16 autocast; torch.compile(model) when compiled,
    with that mode when compiled is a mode name ("reduce-overhead": CUDA graphs, as the hybrid's default step has)."""
    from transformers import AutoModelForCausalLM

    reset_peak()
    lm = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, attn_implementation="sdpa").to(DEVICE)
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, fused=CUDA)
    if isinstance(compiled, str):
        fwd = torch.compile(lm, mode=compiled)
    else:
        fwd = torch.compile(lm) if compiled else lm
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, lm.config.vocab_size, (B, T), generator=g).to(DEVICE) for _ in range(4)]

    def one(i: int) -> None:
        ids = batches[i % len(batches)]
        if compiled == "reduce-overhead":  # a new step: the graphs' earlier outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    warm, sec = loop_seconds(one, warmup, steps)
    params = sum(p.numel() for p in lm.parameters())
    res = {"tokens_per_s": steps * B * T / sec, "peak_gib": peak_gib(), "warmup_s": round(warm, 1), "params": params,
           "compiled": compiled}
    if profile is not None:
        res["profile"] = profile_steps(one, profile)
    return with_mfu(res, params)


def hybrid_part(a, spec: dict, teacher: Path, work: Path) -> dict:
    """One part of --hybrid (HYBRID_PARTS), in this process; with spec["warm_only"] (--prewarm) two untimed steps,
    to fill torch.compile's caches."""
    T = spec.get("T", 512)
    warmup, steps = (1, 1) if spec.get("warm_only") else (3, 10)
    try:
        if spec["kind"] == "plain":
            prof = Path(a.out) / f"profile-{spec['name']}.txt" if spec.get("profile") else None
            return plain_lm_rate(teacher, T, spec["compiled"], warmup, steps, prof)
        cache = str(cache_for(a, teacher, work, T))
        if spec["kind"] == "v2":
            cfg = DistillConfig(cache=cache, out=str(work / "v2"), recipe="v2", steps=a.steps, batch_size=B,
                                grad_accum=1)
            prof = Path(a.out) / f"profile-{spec['name']}.txt" if spec.get("profile") else None
            res = step_rate(cfg, gpu_batches(cache, plan_budget(cfg, load_manifest(cache)).groups, 4), warmup, steps,
                            prof)
            return with_mfu(res, res["params"]["total"] if isinstance(res["params"], dict) else res["params"])
        cfg = DistillConfig(cache=cache, out=str(work / "hybrid"), recipe="hybrid", steps=a.steps, batch_size=B,
                            grad_accum=1, precision=spec.get("precision", "auto"), max_gpu_memory=spec.get("cap"),
                            compile=spec.get("compile", "auto"), activation_budget=spec.get("activation_budget"),
                            loss_chunk=spec.get("loss_chunk", -1))
        prof = Path(a.out) / f"profile-{spec['name']}.txt" if spec.get("profile") else None
        res = hybrid_stage_rate(cfg, spec["stage"], warmup, steps, profile=prof)
        return with_mfu(res, res["params"]["total"]) if "params" in res else res
    except Exception as e:  # an out-of-memory under the cap is a result, not a crash
        return {"error": failure(e), "peak_gib": peak_gib()}


def hybrid_bench(a, teacher: Path, out: Path) -> None:
    """Every HYBRID_PARTS entry in its own process, inside --budget; the JSON and a table with each part's ratio
    to plain_lm_compiled."""
    res = {"shape": a.shape, "batch": B, **describe(), "peak_tflops": peak_tflops()}
    budget = Budget(a.budget)
    path = out / f"distill-hybrid-{a.shape}.json"
    names = a.parts.split(",") if a.parts else list(HYBRID_PARTS)
    unknown = [n for n in names if n not in HYBRID_PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(HYBRID_PARTS)}")
    parts = {n: HYBRID_PARTS[n] for n in names}  # in the order given
    if a.prewarm:
        res["prewarm_s"] = prewarm(a, teacher, parts)
        if a.prewarm_only:
            print(f"prewarm: {res['prewarm_s']} s", flush=True)
            return
    for name, spec in parts.items():
        spec = {**spec, "name": name, "profile": a.profile}
        left = budget.left()
        if left is not None and left < PART_MIN_S:
            res[name] = {"error": f"not run: {left:.0f} s of --budget left"}
            continue
        t0 = time.monotonic()
        res[name] = run_result(child_command(a, "--hybrid-stage", spec), left, child_env(**spec.get("env", {})))
        res[name]["wall_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps({name: res[name]}), flush=True)
        write_json(path, res)
    # The peer at its best: the faster of torch.compile's default and its CUDA-graph mode (the anchor's step is
    # host-bound under the default mode on a slow host: 2,025 kernels in 35 ms of GPU time, 77 ms of wall, H100)
    def best(*names):
        rates = [res.get(n, {}).get("tokens_per_s") for n in names]
        return max([r for r in rates if r], default=None)

    anchor = best("plain_lm_compiled", "plain_lm_compiled_cudagraphs")
    anchor_2048 = best("plain_lm_compiled_2048", "plain_lm_compiled_2048_cudagraphs")
    for name in parts:
        r = res[name]
        ref = anchor_2048 if "_2048" in name else anchor
        if ref and "tokens_per_s" in r:
            r["x_plain_lm_compiled"] = round(r["tokens_per_s"] / ref, 3)
    write_json(path, res)
    head = [f"{a.shape}, batch {B}", "tokens/s", "x plain LM compiled (best mode)", "MFU", "peak GiB", "error"]
    cells = [[n, f"{res[n].get('tokens_per_s', float('nan')):,.0f}", res[n].get("x_plain_lm_compiled", "-"),
              res[n].get("mfu", "-"), res[n].get("peak_gib", "-"), res[n].get("error", "")] for n in parts]
    print("\n" + "\n".join(table(head, cells)))


def prewarm(a, teacher: Path, parts: dict) -> float:
    """Every part compiled before any is timed, --prewarm at a time, each in its own process running two untimed
    steps: the timed pass then reads inductor's caches (on disk, shared by the processes) instead of compiling
    again, ~150 s a stage II part otherwise, so the anchor and every part fit one call. The parts' caches are built
    here first (concurrent builds of one cache would race). Returns the seconds it took."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    for T in sorted({spec.get("T", 512) for spec in parts.values() if spec["kind"] != "plain"}):
        cache_for(a, teacher, Path(a.work), T)

    def warm(item):
        name, spec = item
        r = run_result(child_command(a, "--hybrid-stage", {**spec, "name": name, "warm_only": True}), None,
                       child_env(**spec.get("env", {})))
        print(json.dumps({f"prewarm {name}": {k: r.get(k) for k in ("warmup_s", "error") if k in r}}), flush=True)

    # The anchors too: the half speed an anchor showed after a prewarm (distill-step-h200-prewarm) was its
    # default-mode step being host-bound, not the prewarm (distill-step-h100-anchor); the CUDA-graph anchor's
    # compile takes ~100 s cold.
    with ThreadPoolExecutor(a.prewarm) as pool:
        list(pool.map(warm, parts.items()))
    # Triton's runtime autotuning picked each generated kernel's launch config while the GPU was shared; its choices
    # (*.best_config beside the kernels) are dropped, so each timed process tunes its kernels alone
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    for p in Path(cache_dir()).rglob("*.best_config"):
        p.unlink(missing_ok=True)
    return round(time.monotonic() - t0, 1)


def hybrid_stage_rate(cfg: DistillConfig, stage: int, warmup: int = 3, steps: int = 10,
                      profile: Path | None = None) -> dict:
    """tokens/s and peak memory of one stage of the hybrid recipe's step (the library's Trainer), on cache rows
    already on the device; with `profile`, a profile of three more steps written there (profile_steps)."""
    from torch._dynamo.utils import counters

    reset_peak()
    try:
        tr = setup(cfg)
        tr.begin_stage(tr.plan.stages[stage])
        batches = gpu_batches(cfg.cache, 0, 4)
        warm_s, sec, one = time_steps(tr, batches, warmup, steps)
    except Exception as e:  # an out-of-memory under the cap is a result, not a crash
        return {"error": failure(e), "peak_gib": peak_gib()}
    T = batches[0][schema.INPUT_IDS].shape[1]
    res = {"tokens_per_s": steps * B * T / sec, "peak_gib": peak_gib(), "precision": tr.plan.info["precision"],
           "compile": tr.plan.info["compile"], "compile_scope": tr.plan.info.get("compile_scope"), "T": T,
           "warmup_s": round(warm_s, 1), "graph_breaks": sum(counters["graph_break"].values()),
           "graphs": counters["stats"].get("unique_graphs", 0),
           "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
           # what torch.compile's caches served (warmup_s depends on it): FX graphs and AOTAutograd entries
           "cache_counters": {k: v for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items()
                             if "cache" in k},
           "mlstm_kernel": tr.plan.info["mlstm_kernel"], "checkpointing": tr.plan.info["checkpointing"],
           "activation_budget": tr.plan.info.get("activation_budget"),
           "params": tr.model.param_counts()}
    if profile is not None:
        res["profile"] = profile_steps(one, profile)
    return res
