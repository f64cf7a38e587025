"""Where and how a distill run executes: device precision, torch.compile mode, GPU memory cap, loss chunking
and DataLoader workers, each resolved from its option and the device."""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from tcache.device import resolve_dtype
from tcache.errors import TcacheError
from tcache.units import parse_bytes

# --compile -> torch.compile mode (None: eager)
COMPILE_MODES = {"auto": None, "off": None, "on": "default", "cudagraphs": "reduce-overhead"}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The teacher's dtype rules (resolve_dtype), plus: fp16 autocast needs CUDA (CPU autocast is bf16 only)."""
    if precision == "fp16" and device.type != "cuda":
        raise TcacheError("--precision fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    return resolve_dtype(precision, device, flag="--precision")


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
    """--loss-chunk -1 -> 1024 positions: no (B, T, V) logits are kept, on a GPU and on CPU alike (on CPU the
    v1 step took the same time and 0.92 GiB less at 8 x 512 tokens, benchmarks/results/cpu-memory.md)."""
    return loss_chunk if loss_chunk >= 0 else 1024


def resolve_workers(workers: int, device: torch.device) -> int:
    """--workers -1 -> min(4, cores / 2) readers feeding a GPU; 0 on CPU, where training needs the cores."""
    if workers >= 0:
        return workers
    return min(4, (os.cpu_count() or 2) // 2) if device.type == "cuda" else 0


def resolve_checkpointing(choice: str, device: torch.device, budget: int | None, family: str = "hybrid") -> bool:
    """--checkpointing auto -> on for a GPU with under 24 GiB to spend (the cap, else the card): the hybrid's
    stage II at SmolLM2-360M's shape and 8 x 512 tokens peaks at 21.7 GiB without it (benchmarks/results/
    hybrid-seeds-run2), so a 16 GB card needs it. On CPU: on for the xLSTM recipes, whose vanilla sLSTM
    blocks keep 1.3 GiB each per 4,096 tokens for the backward (benchmarks/results/cpu-memory.md), off for
    the hybrid. xLSTM recipes on a GPU: off (their blocks are compiled; they peak at 2.4 GiB)."""
    if choice != "auto":
        return choice == "on"
    if device.type != "cuda":
        return family == "xlstm"
    if family == "xlstm":
        return False
    total = budget if budget is not None else torch.cuda.get_device_properties(device).total_memory
    return total < 24 * 2**30


def compile_step(terms: Callable, mode: str = "default", fullgraph: bool = False, backend: str = "inductor",
                 fallback: bool = False, memory_budget: float | None = None, regions: bool = False) -> Callable:
    """A step's forward and loss terms, terms(batch, temperature) -> dict, through torch.compile as one graph (its
    backward as one more); mode reduce-overhead replays them as CUDA graphs. With `fallback` (--compile auto), a
    graph the backend cannot compile (Triton on a GPU nobody here could test, a T4's sm 7.5) warns once and the run
    goes on eagerly: nothing has trained yet when the first call compiles. `memory_budget` (--activation-budget): the
    share of the activations the graph keeps for its backward; AOTAutograd's min-cut partitioner recomputes the rest
    (torch._functorch.config.activation_memory_budget, read when a graph compiles: set around every call, so a
    recompile gets it too). `regions` (the layers marked by mark_regions): inductor without buffer reuse, which
    gave wrong gradients through nested compile regions (torch 2.13, CPU: benchmarks/region_grads.py)."""
    fn = torch.compile(terms, mode=None if mode == "default" else mode, dynamic=False, fullgraph=fullgraph,
                       backend=backend)
    # Stage I's mixers keep their match losses as attributes (a side effect inside transformers' checkpointed layers,
    # which dynamo refuses to trace unless told not to replay it in the recompute: the recomputed forward's losses
    # are never read, only the first forward's)
    flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    patch = {flag: True} if hasattr(torch._dynamo.config, flag) else {}
    budget = {} if memory_budget is None else {"activation_memory_budget": memory_budget}
    inductor = {"allow_buffer_reuse": False} if regions else {}
    eager = []  # set once compilation failed under fallback

    def call(batch: dict, temperature: float) -> dict:
        if eager:
            return terms(batch, temperature)
        try:
            with torch._dynamo.config.patch(**patch), torch._functorch.config.patch(**budget), \
                    torch._inductor.config.patch(**inductor):
                return fn(batch, temperature)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            if not fallback:
                raise
            warnings.warn(f"--compile auto: torch.compile failed on this GPU ({str(e).splitlines()[0][:200]}); "
                          "training goes on without it (pass --compile off to skip the attempt)")
            eager.append(True)
            return terms(batch, temperature)
    return call


def mark_regions(layers) -> None:
    """Each of `layers` (one class: a model's decoder layers) as a torch.compiler.nested_compile_region, so a compiled
    step traces and compiles one layer and stamps it out for the rest: the hybrid's stage II step cold-compiled in
    42.9 s instead of 199.4 s at 16 layers (CPU, torch 2.13). By a subclass whose forward is the region, swapped in
    for the layers' class: the region must be one function for all layers to share it. Opt-in
    (TCACHE_COMPILE_SCOPE=regions); compile_step(regions=True) turns inductor's buffer reuse off, without which its
    gradients through regions were wrong (benchmarks/region_grads.py)."""
    base = type(layers[0])
    if getattr(base, "_tcache_region", False):  # marked already (a second stage's build, say)
        return
    region = type(f"Region{base.__name__}", (base,), {"forward": torch.compiler.nested_compile_region(base.forward),
                                                       "_tcache_region": True})
    for layer in layers:
        layer.__class__ = region
