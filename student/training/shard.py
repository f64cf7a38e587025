"""FSDP2 for `tcache distill --shard`: whether a run splits its student over torchrun's ranks, the wrapping (each
decoder layer or xLSTM block, then the root), the sharded weights and optimizer state of a checkpoint
(torch.distributed.checkpoint), the full state dict the saved student is written from, and the bytes per rank a
run needs with and without sharding (--shard auto, `tcache distill --plan`)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from tcache import dist
from tcache.errors import TcacheError

DCP_DIR = "sharded"
"""A sharded checkpoint's weights and optimizer state (torch.distributed.checkpoint's files), beside trainer.pt."""
FIT_FRACTION = 0.9
"""--shard auto: the share of a GPU the unsharded weights, gradients, optimizer and activations may take (the rest:
the CUDA context, the allocator's fragmentation)."""
ACTIVATION_FACTOR = 34
"""Bytes of activations kept per token, layer and hidden unit in 16-bit training (Korthikanti et al. 2022, without
attention scores): the planning estimate; fp32 doubles it, recomputation (--checkpointing) keeps 2 a layer and
one layer's 34."""


def fsdp_conflicts(cfg, why: str) -> None:
    """Refuse the options sharding does not combine with yet (none is built or measured on sharded parameters):
    `why` names what asked for sharding."""
    bad = [flag for flag, on in (("--train lora", cfg.train == "lora"), ("--qk-merge", cfg.qk_merge),
                                 ("--compile cudagraphs", cfg.compile == "cudagraphs"),
                                 ("--precision fp16", cfg.precision == "fp16")) if on]
    if bad:
        raise TcacheError(f"{why} does not combine with {', '.join(bad)} yet; drop {'it' if len(bad) == 1 else 'them'}"
                          " or pass --shard none")


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP2 shards one at a time: the hybrid's decoder layers, the xLSTM recipes' blocks."""
    return list(model.lm.model.layers) if model.family == "hybrid" else list(model.blocks.blocks)


def resolve_shard(cfg, manifest, device: torch.device, budget: int | None, amp_dtype: torch.dtype) -> bool:
    """--shard -> whether this run shards. auto: only under torchrun on GPUs, when the unsharded student (its
    weights, gradients, AdamW state and activations: run_memory) exceeds FIT_FRACTION of the GPU (or
    --max-gpu-memory)."""
    if cfg.shard == "fsdp" and dist.world() == 1:
        raise TcacheError("--shard fsdp splits the student over torchrun's processes; run under torchrun "
                          "--nproc_per_node N (N >= 2), or pass --shard none")
    if cfg.shard == "none":
        return False
    if cfg.shard == "auto":
        if dist.world() == 1 or device.type != "cuda":
            return False
        total = budget if budget is not None else torch.cuda.get_device_properties(device).total_memory
        if sum(run_memory(cfg, manifest, device, 1, False, capacity=total).values()) <= FIT_FRACTION * total:
            return False
        fsdp_conflicts(cfg, "--shard auto shards this student (unsharded it would not fit one GPU), which")
    if amp_dtype is torch.float16:  # --precision auto on a GPU without bf16 (a T4)
        raise TcacheError("sharding (--shard) does not combine with fp16 yet (its loss scaling over sharded gradients "
                          "is not built); pass --precision fp32, or --shard none")
    return True


def shard_model(model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype) -> torch.nn.Module:
    """FSDP2 in place: each block, then the root (embedding, norm, head, frozen or not), over all ranks. On CUDA
    in bf16 the gathered parameters are bf16 and gradients reduce in fp32. The loop calls features() and the head,
    never forward(): features() gets the root's hooks (the head's weight stays gathered from features() to the
    backward, as the root's parameters are not freed after its forward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.world(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" and amp_dtype is torch.bfloat16 else MixedPrecisionPolicy())
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "features")
    if hasattr(model, "match_loss"):
        # the hybrid's stage I: its loss is each layer's kept matching error, and features()' output (the teacher-
        # forced residual stream) needs no gradient, so no FSDP2 backward hook would fire from it; match_loss()'s
        # output registers the root's, whose end-of-backward callback reduce-scatters every layer's gradients
        register_fsdp_forward_method(model, "match_loss")
    return model


def begin_stage(model: torch.nn.Module, match: bool) -> None:
    """The hybrid's stage I keeps each layer's weights gathered from its forward to the backward: the backward
    reaches a layer through its matching error alone, never through its output, so FSDP2 would not gather them
    again there (its pre-backward hook sits on the output). Stage II and the xLSTM recipes free them after each
    layer's forward, as FSDP2 does by default."""
    for block in blocks(model):
        block.set_reshard_after_forward(not match)


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for sharded gradients: the sum of squares of each rank's shards, all-reduced.
    torch's own on these DTensors was 1.7e-5 off the float64 norm in fp32 (tests/test_fsdp.py's hybrid; this one:
    5e-8), where an unsharded run's is 1e-7 off. Returns the norm before clipping (a plain tensor, every rank)."""
    import torch.distributed as tdist

    local = [p.grad.to_local() for p in params if p.grad is not None]
    total = torch.stack([g.float().pow(2).sum() for g in local]).sum()  # () this rank's shards
    tdist.all_reduce(total)
    total = total.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's: no branch, no sync with the device
    torch._foreach_mul_(local, coef.to(local[0].dtype))
    return total


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def save_sharded(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the trainable weights (buffers too) and of AdamW's state into `path`; frozen
    weights are the cache's teacher, as in an unsharded checkpoint. A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model, options=_options(ignore_frozen_params=True)),
              "optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(path))


def load_sharded(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """`path`'s weights and optimizer state into this run's model, sharded or not, on any number of ranks
    (torch.distributed.checkpoint reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    # the optimizer's state must exist to be loaded into: get_optimizer_state_dict creates it by a zero step, but
    # only where no .grad is set (begin_stage keeps zeroed .grad under accumulation)
    kept = [(p, p.grad) for g in opt.param_groups for p in g["params"]]
    for p, _ in kept:
        p.grad = None
    state = {"model": get_model_state_dict(model, options=_options(ignore_frozen_params=True)),
             "optimizer": get_optimizer_state_dict(model, opt)}
    with warnings.catch_warnings():  # one process reads it without a process group, as meant: no warning for that
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=dist.world() == 1)
    set_model_state_dict(model, state["model"], options=_options(strict=False))
    set_optimizer_state_dict(model, opt, state["optimizer"])
    for p, g in kept:
        p.grad = None if g is None else torch.zeros_like(p)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole student's state dict on rank 0, on the CPU (empty on the other ranks), so the saved student is the
    unsharded one's. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def memory(params: int, trainable: int, world: int, sharded: bool, activations: int) -> dict[str, int]:
    """Bytes per rank: fp32 weights, gradients of the trainable ones, AdamW's two fp32 moments, and `activations`
    (per rank's micro-batch, the same sharded or not)."""
    n = world if sharded else 1
    return {"weights": math.ceil(params * 4 / n), "gradients": math.ceil(trainable * 4 / n),
            "optimizer": math.ceil(trainable * 8 / n), "activations": activations}


def activation_bytes(tokens: int, hidden: int, layers: int, vocab: int, chunk: int, half: bool,
                     checkpointing: bool) -> int:
    """A rough estimate of one micro-batch's activations on a rank (ACTIVATION_FACTOR), plus the fused CE + KD's
    chunk of logits (chunk positions x V, fp32, with its softmax and gradient; 0: the whole micro-batch's)."""
    per_layer = ACTIVATION_FACTOR * tokens * hidden * (1 if half else 2)
    kept = (layers * 2 * tokens * hidden * (2 if half else 4) + per_layer) if checkpointing else layers * per_layer
    return kept + 3 * 4 * vocab * (min(chunk, tokens) if chunk else tokens)


def smallest_world(params: int, trainable: int, activations: int, capacity: int, most: int = 4096) -> int | None:
    """The fewest ranks whose sharded bytes per rank fit FIT_FRACTION of `capacity` (1: unsharded); None: none up
    to `most` (the activations alone do not fit)."""
    for n in range(1, most + 1):
        if sum(memory(params, trainable, n, n > 1, activations).values()) <= FIT_FRACTION * capacity:
            return n
    return None


def meta_counts(cfg, manifest) -> tuple[int, int]:
    """(parameters, the most any stage trains) of the run's student, built on the meta device (no weights read)."""
    from tcache.student.training.config import student_config

    with torch.device("meta"):
        if cfg.recipe == "hybrid":
            from transformers import AutoConfig, AutoModelForCausalLM

            from tcache.student.models.hybrid import HybridStudent
            from tcache.student.training.families import hybrid_config
            from tcache.teachercache import schema

            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(Path(cfg.cache) / schema.TEACHER_DIR))
            model = HybridStudent(lm, hybrid_config(cfg))
        else:
            from tcache.student.models.xlstm import Student

            model = Student(student_config(cfg, manifest))
            if cfg.from_scratch:
                model.embed.requires_grad_(True)
                model.head.requires_grad_(True)
    trainable = 0
    for stage in cfg.stages:
        model.set_stage(stage.train if stage.loss == "match" else cfg.train,
                        "match" if stage.loss == "match" else "hybrid")
        trainable = max(trainable, model.param_counts()["trainable"])
    return model.param_counts()["total"], trainable


def run_memory(cfg, manifest, device: torch.device, world: int, sharded: bool, counts: tuple[int, int] | None = None,
               capacity: int | None = None) -> dict[str, int]:
    """memory() of this run's student on one of `world` ranks: its parameter counts (meta_counts, or `counts`) and
    the activations of --batch-size rows at the cache's length (bf16 / fp16 on a GPU, fp32 on the CPU; recomputed
    as --checkpointing resolves it for a GPU of `capacity` bytes)."""
    from tcache.student.training.config import RECIPES, student_config
    from tcache.student.training.runtime import resolve_loss_chunk

    params, trainable = counts or meta_counts(cfg, manifest)
    family = RECIPES[cfg.recipe].model
    layers = manifest.num_layers if family == "hybrid" else student_config(cfg, manifest).num_blocks
    half = device.type == "cuda" and cfg.precision != "fp32"
    if cfg.checkpointing != "auto":
        recompute = cfg.checkpointing == "on"
    elif device.type == "cuda":  # runtime.resolve_checkpointing's rule, for a GPU of `capacity`
        recompute = family == "hybrid" and capacity is not None and capacity < 24 * 2**30
    else:
        recompute = family == "xlstm"
    acts = activation_bytes(cfg.batch_size * manifest.seq_len, manifest.hidden_size, layers, manifest.vocab_size,
                            resolve_loss_chunk(cfg.loss_chunk, device), half, recompute)
    return memory(params, trainable, world, sharded, acts)


def plan(cfg, manifest, capacity: int, worlds: tuple[int, ...] = (2, 4, 8)) -> dict:
    """What `tcache distill --plan` prints: bytes per GPU rank, unsharded and sharded over each of `worlds` ranks,
    and the fewest ranks whose share fits a GPU of `capacity` bytes (FIT_FRACTION of it)."""
    params, trainable = meta_counts(cfg, manifest)
    cuda = torch.device("cuda")
    per_rank = {n: run_memory(cfg, manifest, cuda, n, n > 1, (params, trainable), capacity) for n in (1, *worlds)}
    return {"params": params, "trainable": trainable, "batch_size": cfg.batch_size, "seq_len": manifest.seq_len,
            "gpu_memory": capacity, "fit_fraction": FIT_FRACTION, "per_rank": per_rank,
            "smallest_world": smallest_world(params, trainable, per_rank[1]["activations"], capacity)}
