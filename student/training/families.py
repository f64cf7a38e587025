"""Model families: how a recipe's student is built from the config and the cache, on a device. A recipe names
its family (Recipe.model); the training loop only calls build() and the model's set_stage()."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tcache.errors import TcacheError
from tcache.student.training.config import DistillConfig, student_config
from tcache.student.models.io import load_teacher_parts
from tcache.student.models.xlstm import Student, resolve_kernels
from tcache.student.training.runtime import COMPILE_MODES, mark_regions, resolve_checkpointing, resolve_compile
from tcache.teachercache import schema


COMPILE_SCOPE_ENV = "TCACHE_COMPILE_SCOPE"
"""What --compile compiles. step (the hybrid's default): the whole forward and loss terms as one graph (the mLSTM
kernel is a custom op, so nothing breaks it: models/mlstm_kernel.py), 1.38x the per-layer step's tokens/s on an H200
(benchmarks/results/distill-step-h200); layer (the xLSTM recipes' default, their whole step not yet measured): each
decoder layer / xLSTM block on its own. regions (the hybrid, opt-in): the step's one graph with each decoder layer
a nested compile region (runtime.mark_regions), compiled once and stamped out per layer."""
DEFAULT_SCOPE = {"xlstm": "layer", "hybrid": "step"}
SCOPES = ("layer", "step", "regions")


def build_xlstm(cfg: DistillConfig, manifest, device: torch.device, budget: int | None, sharded: bool = False):
    """Distil-xLSTM: fresh xLSTM blocks between the teacher's frozen embedding and head. `sharded`: FSDP2 wraps it
    next (shard.py), each block compiled on its own first (sharded_compile)."""
    scfg = student_config(cfg, manifest)
    if cfg.activation_budget is not None:
        raise TcacheError("--activation-budget is for the hybrid recipe's compiled step; drop it for --recipe v1 / v2")
    mlstm_kernel, slstm_backend = resolve_kernels(scfg, device, budget)
    torch.manual_seed(cfg.seed)
    model = Student(scfg, mlstm_kernel=mlstm_kernel, slstm_backend=slstm_backend)
    if cfg.from_scratch:  # the baseline: nothing of the teacher, its embedding and head learnt too
        model.embed.requires_grad_(True)
        model.head.requires_grad_(True)
    else:
        model.load_teacher_parts(load_teacher_parts(cfg.cache))
    model.to(device)
    model.checkpointing = resolve_checkpointing(cfg.checkpointing, device, budget, family="xlstm")
    compile_mode = resolve_compile(cfg.compile, device)
    compile_mode = sharded_compile(compile_mode) if sharded else compile_mode
    if model.checkpointing and compile_mode != "off":
        # recomputing compiled (CUDA-graph) blocks inside torch.utils.checkpoint is not a combination measured
        # here: whichever of the two was asked for wins, both asked for is refused
        if cfg.checkpointing == "auto":
            model.checkpointing = False
        elif cfg.compile == "auto":
            compile_mode = "off"
        else:
            raise TcacheError(f"--checkpointing on with --compile {cfg.compile} is not supported; pass --compile off "
                              "or --checkpointing off")
    info = {"mlstm_kernel": mlstm_kernel, "slstm_backend": slstm_backend, "blocks": scfg.num_blocks,
            "heads": scfg.num_heads, "slstm_at": scfg.slstm_at, "compile": compile_mode,
            "checkpointing": model.checkpointing,
            **apply_compile(model.blocks.blocks, compile_mode, compile_scope("xlstm", sharded))}
    return model, info


def hybrid_config(cfg: DistillConfig):
    """The hybrid student's shape from the run's options."""
    from tcache.student.models.hybrid import HybridConfig

    return HybridConfig(window=cfg.window, sinks=cfg.sinks, full_attention_layers=list(cfg.full_attention_layers),
                        mlstm_kernel=cfg.mlstm_kernel if cfg.mlstm_kernel != "parallel" else "auto",
                        branches=cfg.branches, mlstm_rope=cfg.mlstm_rope, igate_bias=cfg.igate_bias,
                        feature_dim=cfg.feature_dim, mlstm_heads=cfg.mlstm_heads, mix=cfg.mix)


def build_hybrid(cfg: DistillConfig, manifest, device: torch.device, budget: int | None, sharded: bool = False):
    """Hauzenberger et al.: the teacher from the cache's full weights, attention replaced by hybrid mixers.
    `sharded`: FSDP2 wraps it next (shard.py), each decoder layer compiled on its own first (sharded_compile)."""
    from tcache.student.models.hybrid import load_hybrid

    hcfg = hybrid_config(cfg)
    torch.manual_seed(cfg.seed)
    model = load_hybrid(str(Path(cfg.cache) / schema.TEACHER_DIR), hcfg)
    model.qk_merge_at_stage2 = cfg.qk_merge  # step 3 between the stages (student/models/qk_merge.py)
    if cfg.init is not None:  # stage II from a finished student (a merge, say): student/models/merge.py
        from tcache.student.models.merge import load_init

        load_init(model, cfg.init, manifest, hcfg)
    lora = None
    if cfg.train == "lora":  # stage II's adapters, there from the start (B = 0: they add nothing until they train)
        from tcache.student.models.lora import add_adapters

        lora = add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.to(device)
    kernel = model.set_kernel(device)
    share = cfg.activation_budget  # the compiler recomputes what the step does not keep: no per-layer wrappers
    checkpointing = resolve_checkpointing(cfg.checkpointing, device, budget) and share is None
    if checkpointing:
        model.enable_checkpointing()
    compile_mode = hybrid_compile(cfg.compile, device, checkpointing)
    compile_mode = sharded_compile(compile_mode) if sharded else compile_mode
    scope = compile_scope("hybrid", sharded)
    if share is not None and not (0 <= share <= 1 and compile_mode != "off" and scope != "layer"):
        raise TcacheError(f"--activation-budget {share}: a share in [0, 1] of the activations the compiled step keeps "
                          "(one graph: --compile on or cudagraphs, or auto on a GPU; not under FSDP); fix it or drop "
                          "--activation-budget")
    if checkpointing and compile_mode == "cudagraphs" and scope == "layer":
        raise TcacheError("--compile cudagraphs does not compose with per-layer compilation under activation "
                          f"checkpointing; pass --compile on, --checkpointing off, or {COMPILE_SCOPE_ENV}=step")
    # regions inside checkpoints: dynamo's internal error (a node of another graph, torch 2.13, CPU); under an
    # activation budget the partitioner's recompute gave 33 of 38 stage II gradients wrong at budget 0 (CPU)
    if scope == "regions" and compile_mode != "off" and (checkpointing or share is not None):
        what = "activation checkpointing" if checkpointing else "--activation-budget"
        raise TcacheError(f"{COMPILE_SCOPE_ENV}=regions does not run under {what}; unset {COMPILE_SCOPE_ENV}, or "
                          f"{'pass --checkpointing off' if checkpointing else 'drop --activation-budget'}")
    # step scope: the Trainer compiles forward + losses as one graph; layer scope: each decoder layer fused by
    # inductor, transformers' checkpointing wrapping the layer's __call__ so a recomputed layer reruns it compiled
    compiled = apply_compile(model.lm.model.layers, compile_mode, scope)
    info = {"mlstm_kernel": kernel, "slstm_backend": "none", "blocks": len(model.lm.model.layers),
            "heads": model.lm.config.num_attention_heads, "slstm_at": [], "compile": compile_mode,
            "window": cfg.window, "sinks": cfg.sinks, "full_attention_layers": hcfg.full_attention_layers,
            "branches": cfg.branches, "checkpointing": checkpointing, "activation_budget": share, **compiled}
    if lora is not None:
        info["lora"] = lora
    return model, info


def compile_scope(family: str, sharded: bool = False) -> str:
    """COMPILE_SCOPE_ENV, else the family's default scope; layer under FSDP2 (sharded_compile)."""
    if sharded:
        return "layer"
    scope = os.environ.get(COMPILE_SCOPE_ENV) or DEFAULT_SCOPE[family]
    if scope not in SCOPES or (scope == "regions" and family != "hybrid"):
        raise TcacheError(f"{COMPILE_SCOPE_ENV}={scope!r} is not one of layer, step (or regions, the hybrid's); set "
                          "one of them, or unset it")
    return scope


def sharded_compile(mode: str) -> str:
    """--compile under FSDP2: each layer or block compiled on its own before fully_shard wraps it, as torchtitan
    does (FSDP2's hooks stay outside the compiled code: dynamo skips them), never as CUDA graphs, whose replay would
    hold the collectives' buffers: auto's cudagraphs becomes on (an explicit --compile cudagraphs is refused with
    --shard, shard.fsdp_conflicts)."""
    return "on" if mode == "cudagraphs" else mode


def apply_compile(modules, compile_mode: str, scope: str) -> dict:
    """--compile by `scope` (compile_scope): each of `modules` compiled in place (layer), or nothing here and the
    Trainer compiles the whole forward + loss as one graph (step: train.setup reads info's step_compile; regions:
    the modules marked first). Returns the info keys."""
    mode = COMPILE_MODES[compile_mode]
    if scope == "regions" and mode is not None:
        mark_regions(modules)
    if scope != "layer":
        return {"compile_scope": scope, "step_compile": mode}
    if mode is not None:
        for module in modules:
            module.compile(mode=mode)
    return {"compile_scope": scope}


TRITON_MIN_CAPABILITY = (7, 5)
"""The oldest GPU the hybrid's --compile auto compiles for: a T4 (sm 7.5), whose fp16 tensor-core MMA upstream
Triton targets (inductor's own floor is 7.0); the 16 GiB emulation on a larger GPU then runs what a T4 runs."""


def hybrid_compile(choice: str, device: torch.device, checkpointing: bool = False) -> str:
    """The hybrid's --compile: auto is cudagraphs (the whole step one inductor graph replayed as CUDA graphs: 1.40x
    the same graph without them on an H100, wall time = GPU time, same peak memory; benchmarks/results/
    distill-step-h100) on GPUs of compute capability >= 7.5, a T4 included, and off on the CPU. Under activation
    checkpointing (a memory cap, a T4) auto is `on`: CUDA graphs' memory pools beside recomputation under a cap are
    not measured yet."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= TRITON_MIN_CAPABILITY:
        return "on" if checkpointing else "cudagraphs"
    return "off"


FAMILIES = {"xlstm": build_xlstm, "hybrid": build_hybrid}
