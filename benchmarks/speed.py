"""Decode and prefill speed of the students against their teacher, each served through transformers' generate()
(issue 22). One process per row, driven by a parent that writes DIR/speed.json, DIR/speed.md and DIR/speed.png:

    python benchmarks/speed.py --shape smollm2-360m --out DIR          # the GPU run (one H200: > 10 minutes)
    python benchmarks/speed.py --shape smollm2-360m --gpus 2 --out DIR # rows side by side on two GPUs
    python benchmarks/speed.py --shape tiny --device cpu --lengths 64,256 --student-lengths 512 --batches 1,2 \\
        --steps 4 --out DIR                                             # a CPU smoke run
    python benchmarks/speed.py --replot DIR/speed.json                  # speed.md and speed.png again

--cpu-compile makes transformers compile teacher-static's step on CPU too (its switch for testing), a dry run of
what generate() does on CUDA: the smoke run with it shows the compiles in the warm-ups and none in the timed calls.

The GPU run's defaults: contexts 2k,8k,32k for every row and 128k for the students (--student-lengths), batches
1,8,64, 32 timed decode steps, bf16, random weights at the shape of the seeds' teacher (SmolLM2-360M: 32 layers,
D 960, 15 heads / 5 kv heads): speed and memory do not depend on the values.

Rows:
    teacher-static  LlamaForCausalLM, generate(cache_implementation="static"): transformers compiles the decode step
                    itself on CUDA (torch.compile, mode reduce-overhead, its default CompileConfig)
    teacher-eager   LlamaForCausalLM, generate() with its default dynamic cache
    v2, hybrid, v1  the exported student class (TcacheStudentForCausalLM, via to_hf) with its static decode state,
                    a CUDA graph replayed per token (TCACHE_STATIC_DECODE=1 in the row's process; on CPU the same
                    static buffers run uncaptured)
    v2-eager, ...   (only when --models names them) the same students with TCACHE_STATIC_DECODE=0: decode.py's
                    concatenating step, eager; only at
                    --eager-lengths (default the shortest --lengths: a student's step does not depend on the prefix,
                    and the GPU run's time goes to the rows that do)

Each decode cell (context L, batch B) is one timed generate(prompt (B, L), max_new_tokens = min_new_tokens =
steps + 1, greedy) after a warm-up generate at batch B (for teacher-static at the cell's exact static-cache shape, so
its compile and CUDA-graph recording happen there). A logits processor stamps every generated token (CUDA events
on a GPU, no extra synchronisation), so one call splits into its prefill (to the first token) and its decode (the
`steps` forwards after it): the same interval as generate(N) - generate(1), without a second prefill, which at
B x L = 2M tokens would take ~100 times longer than the decode it is subtracted from. Per cell:

    decode_tok_s   B * steps / decode time = B / step_ms (the N = steps + 1 tokens' first comes from the prefill)
    step_ms        decode time / steps; step_ms_median the median step (a one-off in the first steps, e.g. a CUDA
                   graph recorded again for a new static cache, moves the mean, not the median)
    state_bytes    the returned cache: KV (teacher's static or dynamic cache) or the student's state .nbytes()
    peak_gib       torch.cuda.max_memory_allocated over the timed call (decode_peak_gib: from the first token on)
    gbps, bw_frac  (parameters read + state bytes) / step latency, and its fraction of this device's copy bandwidth
    recompiles     teacher rows: torch._dynamo graphs compiled during the timed call (must be 0)
    captures       students: model.static_decode_captures added during the timed call (must be 0)

Prefill tokens/s is one forward (use_cache=True, logits_to_keep=1, as generate's prefill) at batch 1 per context,
after a warm-up at that length. Ratios: every row's decode tokens/s over teacher-static's at the same cell, prefill
over teacher-eager's forward.

--overlap (the default on one GPU): teacher-static's process runs beside the other rows' (one after another), so its
compiles, CPU work of ~50 s each, overlap their measurements; every timed section (a prefill cell's two forwards, a
decode cell's timed generate, the step profile) holds a lock on the GPU, so no two rows ever measure at once. The
warm-ups (4 tokens at a 64-token prompt) run outside it. The students decode after --student-lengths at
--long-batches only (default 1,8).

Time: --budget seconds for all rows together, shared by ROW_WEIGHT; a row's process is stopped at its share (what
it measured is kept: it saves after every cell) and its cells run cheapest first (fewest prompt tokens), so a row
out of time loses its largest cells, which speed.json names as "not run". If a model runs out of memory the cell
says "oom" and the row goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=65536,
                         tie_word_embeddings=True, rope_theta=100000.0),
    # 4 layers: v1 gets 2 blocks (one sLSTM, one mLSTM), so the smoke run covers both block types
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}
ROWS = ("teacher-static", "teacher-eager", "v2", "hybrid", "v1", "v2-eager", "hybrid-eager", "v1-eager")
"""Table order."""
DEFAULT_ROWS = ROWS[:5]
"""--models' default: the two teacher rows and each student as users get it; the -eager student rows (decode.py's
concatenating step, the path before the static one) only when named."""
RUN_ORDER = ("teacher-static", "v2", "hybrid", "teacher-eager", "v2-eager", "hybrid-eager", "v1-eager", "v1")
"""Process order: teacher-static first (every ratio's reference, and its compiles), then the students whose ratios
are the point; v1 last, since its sLSTM prefill is a loop over the prompt that spends whatever it is given."""
ROW_WEIGHT = {"teacher-static": 200, "teacher-eager": 45, "v2": 110, "hybrid": 120, "v1": 110,
              "v2-eager": 30, "hybrid-eager": 40, "v1-eager": 30}
"""Share of --budget per row: estimated seconds of the GPU run (H200, smollm2-360m, the default cells), ~15 s of
each for imports and the build. teacher-static: 3 compiles of 40-60 s each (transformers' default CompileConfig has
automatic dynamic shapes: a static graph, then one with the cache length dynamic, then the batch) and ~3M prompt
tokens; v2 and the hybrid: one CUDA-graph capture per batch (~15 s) and ~4M prompt tokens at ~80k tokens/s (batch
64 x 128k would be 8.4M more: not in --long-batches' default); v1 the same, its sLSTM prefill on xlstm's CUDA cells
(student/inference/slstm_cuda.py: ~22 s of nvcc first); teacher-eager: --eager-steps eager steps of ~0.1 s per cell. With
--overlap, teacher-static's lane has the whole budget and the other rows share it by these weights."""
STATIC_ENV = "TCACHE_STATIC_DECODE"
WARM_PROMPT = 64
"""Prompt tokens of the warm-up generate: the decode step's shapes do not depend on it (the static cache's length is
set explicitly), and it is longer than the hybrid's window + sinks."""
WARM_NEW_TOKENS = 4
"""Tokens of the warm-up generate: three decode steps compile teacher-static's step, run its CUDA-graph tree's
warm-up and record it (the static cache's length is stated, so not the token count but cache_len sets the shapes);
a student captures at its first step. Few, so a warm-up beside another row's measurement (--overlap) barely touches
the GPU."""
LOCKED_WARM_UP_BYTES = 8 * 2**30
"""A teacher's warm-up whose KV cache is larger than this holds the GPU lock (--overlap)."""
FATAL_RC = 3
"""A row's process exits with this after a CUDA error that leaves its context unusable (an illegal memory access):
the parent starts it again for the cells it has not reached, if the row's share has time left."""
MIN_ROW_S = 20.0
"""A row's process is not started with less time than this: importing and building take ~10 s."""
DECODE_KEYS = ("decode_tok_s", "step_ms", "step_ms_median", "state_bytes", "peak_gib", "decode_peak_gib",
               "prefill_s", "bytes_per_step", "gbps", "bw_frac")
"""Per-cell keys, each `{key}_b{B}` mapping a context label to a number (or the cell's "oom" / "failed: ..." /
"not run: ..." string); plus recompiles_b{B} (teacher rows) or captures_b{B} (students)."""


def fmt(v) -> str:
    """A number for a table: thousands separated from 100 up, 3 significant digits below; '-' for none."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def count(text: str) -> int:
    """'2k' -> 2048, '512' -> 512."""
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def label(n: int) -> str:
    """2048 -> '2k', 512 -> '512' (speed.json's context keys)."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def is_teacher(row: str) -> bool:
    return row.startswith("teacher")


def family(row: str) -> str:
    """teacher, v2, hybrid or v1: the model a row builds."""
    return "teacher" if is_teacher(row) else row.removesuffix("-eager")


# --- the plan: which cells a row runs, in which order --------------------------------------------------------------


def contexts(row: str, a, B: int | None = None) -> list[int]:
    """The row's contexts; at batch B (decode cells), --student-lengths only where B is in --long-batches."""
    if is_teacher(row):
        return a.lengths
    if row.endswith("-eager"):
        return a.eager_lengths
    return a.lengths + (a.student_lengths if B is None or B in a.long_batches else [])


def plan(row: str, a) -> list[tuple[str, int, int]]:
    """(kind, batch, context) items, kind 'prefill' (batch 1) or 'decode', cheapest first: the prompt tokens each
    prefills (a prefill item runs twice, warm-up and timed). A row stopped at its time share loses its largest."""
    items = [("prefill", 1, L) for L in contexts(row, a)]
    items += [("decode", B, L) for B in a.batches for L in contexts(row, a, B)]
    return sorted(items, key=lambda it: (it[1] * it[2] * (2 if it[0] == "prefill" else 1), it[0] != "decode", it[1]))


# --- building ----------------------------------------------------------------------------------------------------


def build(row: str, shape: dict, device: torch.device, dtype: torch.dtype):
    """The row's model, eval mode: the teacher as transformers' LlamaForCausalLM, a student as the exported class."""
    def make():
        from transformers import LlamaConfig, LlamaForCausalLM

        from tcache.student.training.recipes import _v1_sizes, _v2_sizes
        from tcache.student.inference.hf import to_hf
        from tcache.student.models.hybrid import HybridConfig, HybridStudent
        from tcache.student.models.xlstm import Student, StudentConfig

        torch.manual_seed(0)
        cfg, fam = LlamaConfig(**shape), family(row)
        if fam == "teacher":
            return LlamaForCausalLM(cfg)
        if fam == "hybrid":
            student = HybridStudent(LlamaForCausalLM(cfg), HybridConfig(window=32, sinks=4))
            student.lm.config._attn_implementation = "sdpa"
        else:
            blocks, heads, slstm_at = {"v1": _v1_sizes, "v2": _v2_sizes}[fam](cfg.num_hidden_layers,
                                                                               cfg.num_attention_heads)
            student = Student(StudentConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_blocks=blocks,
                                            num_heads=heads, slstm_at=slstm_at, context_length=512, recipe=fam))
        return to_hf(student, {"config": {"recipe": fam}})

    try:
        with torch.device(device):  # random init where the model runs: on the CPU it takes seconds per model
            model = make()
    except Exception as e:  # something in a constructor that insists on the CPU: build there, then move
        print(f"[{row}] building on {device} failed ({type(e).__name__}: {e}); building on the CPU", flush=True)
        model = make()
    return model.to(device, dtype).eval()


# --- the device: time and memory --------------------------------------------------------------------------------


class Dev:
    """Where tensors live and how time and memory are read there. On a GPU: CUDA events (they time the device's
    work without making the host wait), synchronize, the caching allocator's peak. On CPU, which runs synchronously:
    the wall clock, and no peak. `cuda` can be set apart from `device` to dry-run the GPU branches on CPU."""

    def __init__(self, device: torch.device, cuda: bool | None = None):
        self.device = device
        self.cuda = device.type == "cuda" if cuda is None else cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def stamp(self):
        """A point in time; `ms(a, b)` reads the interval once the work before b is done (after sync())."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def free(self) -> None:
        """Return what the last cell left (an OOM's traceback frames included) before the next one."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def name(self) -> str:
        return torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu"


def copy_gbps(dev: Dev) -> float:
    """The device's copy bandwidth: bytes read + written per second by a large device-to-device copy, the ceiling
    a memory-bound decode step is measured against (KINDS.md saw ~4.3 TB/s on an H200)."""
    n, reps = (2**30, 10) if dev.cuda else (2**26, 5)
    src = torch.empty(n, dtype=torch.uint8, device=dev.device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch, outside the timing
    dev.sync()
    t0 = dev.stamp()
    for _ in range(reps):
        dst.copy_(src)
    t1 = dev.stamp()
    dev.sync()
    return 2 * n * reps / (dev.ms(t0, t1) / 1e3) / 1e9


def param_bytes_read(model) -> int:
    """Bytes of the parameters one decode step reads: each tensor once (tied ones share storage), without an input
    embedding table that is not also the output head (a lookup reads B rows of it, not the table)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    skip = set()
    if emb is not None and head is not None and emb.weight.data_ptr() != head.weight.data_ptr():
        skip.add(emb.weight.data_ptr())
    seen = {}
    for p in model.parameters():
        if p.data_ptr() not in skip:
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def kv_bytes(model, B: int, positions: int) -> int:
    """Bytes of a transformers KV cache of B x positions for this (Llama-like) model."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize * B * positions


def state_bytes(cache) -> int:
    """Bytes a generation state holds: a student's DecodeState / StaticDecoder count their storage (nbytes()); a
    transformers cache its layers' keys and values."""
    if callable(getattr(cache, "nbytes", None)):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):  # DynamicCache / StaticCache, transformers >= 4.56
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    return total


def graph_count(row: str, model) -> int | None:
    """Compiled or captured graphs so far: torch._dynamo's count for the teacher rows (generate compiles the static
    cache's decode step on CUDA), the static decode path's CUDA-graph captures for a student (None without it)."""
    if is_teacher(row):
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    captures = getattr(model, "static_decode_captures", None)
    return int(captures) if captures is not None else None


def added(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


# --- generate, timed per token -----------------------------------------------------------------------------------


def step_clock(dev: Dev):
    """A logits processor that stamps each generated token. generate() calls it once per forward, right after the
    forward: the first call ends the prefill, the others each end one decode step. At the first it also reads the
    allocator's peak so far (the prefill's) and resets it, so the peak read after the call is the decode's alone."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.marks = []
            self.prefill_peak_gib = None

        def __call__(self, input_ids, scores):
            self.marks.append(dev.stamp())
            if len(self.marks) == 1:
                self.prefill_peak_gib = dev.peak_gib()
                dev.reset_peak()
            return scores

    return StepClock()


def random_ids(B: int, L: int, vocab: int, dev: Dev) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * B + L)
    return torch.randint(0, vocab, (B, L), generator=g).to(dev.device)  # (B, L)


@torch.no_grad()
def generate(model, row: str, ids: torch.Tensor, new_tokens: int, cache_len: int, cpu_compile: bool = False,
             clock=None):
    """generate() as the row serves: greedy, exactly new_tokens tokens, the cache returned (its bytes are measured).
    teacher-static: the static cache at cache_len positions, stated rather than left to generate, so a warm-up with a
    short prompt compiles the step at the timed call's shapes."""
    from transformers import LogitsProcessorList

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids), return_dict_in_generate=True)
    if row == "teacher-static":
        kw.update(cache_implementation="static", max_cache_len=cache_len)
        if cpu_compile:  # transformers' switch for compiling on CPU too (a dry run of the GPU's compile path)
            from transformers import CompileConfig

            cc = CompileConfig()
            cc._compile_all_devices = True
            kw["compile_config"] = cc
    if clock is not None:
        kw["logits_processor"] = LogitsProcessorList([clock])
    return model.generate(ids, **kw)


def returned_cache(out):
    """The cache generate() returned: `cache` in transformers >= 5.2x, `past_key_values` before."""
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


def check_generated(row: str, out, B: int, L: int, new_tokens: int) -> None:
    """generate() made every token and, for a student, carried its state: one prefill then one step per token
    (a transformers that dropped the state would re-run the whole prompt every token)."""
    if tuple(out.sequences.shape) != (B, L + new_tokens):
        raise RuntimeError(f"generate returned {tuple(out.sequences.shape)}, not ({B}, {L + new_tokens})")
    if is_teacher(row):
        return
    pos = getattr(returned_cache(out), "pos", None)
    pos = int(pos.max()) if isinstance(pos, torch.Tensor) else pos
    if pos != L + new_tokens - 1:
        raise RuntimeError(f"the student's state is at position {pos} after generate, not {L + new_tokens - 1}")


class Runner:
    """One row's model and its measurements in this process: warm-ups done, graphs compiled or captured."""

    def __init__(self, row: str, model, dev: Dev, a):
        self.row, self.model, self.dev, self.a = row, model, dev, a
        self.vocab = model.config.vocab_size
        steps = a.eager_steps if row == "teacher-eager" else a.steps
        self.new_tokens = steps + 1  # the first comes from the prefill, then `steps` decode forwards
        self.warm: dict = {}  # warm-up key -> None (done) or its failure, not retried
        self.params = param_bytes_read(model)
        self.bandwidth = copy_gbps(dev)
        self.graphs = {"warmup": 0, "timed": 0}
        self.retries = 0

    def prefill(self, L: int) -> dict:
        """Tokens/s of one forward over (1, L) as generate's prefill runs it, after a warm-up at that length (the
        students' Triton kernels are built per sequence length)."""
        ids = random_ids(1, L, self.vocab, self.dev)
        with torch.no_grad():
            for _ in range(2):  # a warm-up, then the timed forward
                self.dev.sync()
                t0 = time.perf_counter()
                out = self.model(ids, use_cache=True, logits_to_keep=1)
                self.dev.sync()
                seconds = time.perf_counter() - t0
                del out
        return {"prefill_tok_s": L / seconds}

    def warm_up(self, B: int, L: int) -> None:
        """A generate at batch B before the timed one: kernels loaded, a student's CUDA graph captured for B (reused
        at every context), teacher-static's step compiled at this cell's static cache (its length is part of the
        compiled shapes, so once per cell)."""
        key = (B, L) if self.row == "teacher-static" else B
        if key in self.warm:
            if self.warm[key] is not None:
                raise RuntimeError(f"warm-up failed: {self.warm[key]}")
            return
        if self.row == "teacher-static":
            # transformers sizes a new static cache at the largest length any earlier call used (to avoid
            # recompiles); each cell is measured at its own length instead
            self.model.__dict__.pop("_previous_max_cache_length", None)
        before = graph_count(self.row, self.model)
        # a teacher's warm-up allocates the cell's whole KV cache: a large one waits for the GPU (--overlap), so it
        # cannot run another row's measurement out of memory
        big = is_teacher(self.row) and kv_bytes(self.model, B, L + self.new_tokens) > LOCKED_WARM_UP_BYTES
        try:
            with gpu_lock(self.a.gpu_lock if big else None):
                out = generate(self.model, self.row, random_ids(B, WARM_PROMPT, self.vocab, self.dev),
                               min(WARM_NEW_TOKENS, self.new_tokens), L + self.new_tokens, self.a.cpu_compile)
            del out
        except Exception as e:
            self.warm[key] = failure(e)
            raise
        self.graphs["warmup"] += added(before, graph_count(self.row, self.model)) or 0
        self.warm[key] = None

    def timed(self, ids: torch.Tensor, L: int):
        """One timed generate: (its output, its step clock, the stamp before it, graphs it compiled or captured)."""
        clock = step_clock(self.dev)
        before = graph_count(self.row, self.model)
        self.dev.sync()
        self.dev.reset_peak()
        t0 = self.dev.stamp()
        out = generate(self.model, self.row, ids, self.new_tokens, L + self.new_tokens, self.a.cpu_compile, clock)
        self.dev.sync()
        new_graphs = added(before, graph_count(self.row, self.model))
        self.graphs["timed"] += new_graphs or 0
        return out, clock, t0, new_graphs

    def decode(self, B: int, L: int) -> dict:
        """One timed generate at (B, L) after the warm-up, split at its first token into prefill and decode."""
        self.warm_up(B, L)
        ids = random_ids(B, L, self.vocab, self.dev)
        with gpu_lock(self.a.gpu_lock):
            out, clock, t0, new_graphs = self.timed(ids, L)
            if new_graphs:  # it compiled or captured: that time is not a decode step's, so once more (as is)
                self.retries += 1
                del out  # its cache, before the next call allocates another
                out, clock, t0, new_graphs = self.timed(ids, L)
        check_generated(self.row, out, B, L, self.new_tokens)
        if len(clock.marks) != self.new_tokens:
            raise RuntimeError(f"the step clock saw {len(clock.marks)} tokens, not {self.new_tokens}")
        steps = [self.dev.ms(a, b) for a, b in zip(clock.marks, clock.marks[1:])]  # each decode step, ms
        step_ms = sum(steps) / len(steps)
        state = state_bytes(returned_cache(out))
        del out
        decode_peak = self.dev.peak_gib()  # since the first token (the clock reset it there)
        peak = None if decode_peak is None else max(decode_peak, clock.prefill_peak_gib)
        read = self.params + state  # one step reads every parameter and the whole state (a teacher: its KV)
        gbps = read / step_ms / 1e6  # bytes per ms / 1e6 = GB/s
        return {"decode_tok_s": B * 1e3 / step_ms, "step_ms": step_ms, "step_ms_median": statistics.median(steps),
                "state_bytes": state, "peak_gib": peak, "decode_peak_gib": decode_peak,
                "prefill_s": self.dev.ms(t0, clock.marks[0]) / 1e3, "bytes_per_step": read, "gbps": gbps,
                "bw_frac": gbps / self.bandwidth, graph_key(self.row): new_graphs}


def graph_key(row: str) -> str:
    return "recompiles" if is_teacher(row) else "captures"


def failure(e: BaseException) -> str:
    """A cell's failure as speed.json records it: "oom", or the exception's first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "oom"
    return f"failed: {type(e).__name__}: {text[:160]}"


# --- one row's process --------------------------------------------------------------------------------------------


def cell_keys(row: str, kind: str, B: int) -> list[str]:
    """The speed.json keys one plan item fills (each maps context label -> value)."""
    if kind == "prefill":
        return ["prefill_tok_s"]
    return [f"{k}_b{B}" for k in DECODE_KEYS + (graph_key(row),)]


def put(doc: dict, row: str, kind: str, B: int, L: int, result: dict | str) -> None:
    """Record one item: its numbers, or its failure / not-run string under every key it would have filled."""
    for key in cell_keys(row, kind, B):
        name = key if kind == "prefill" else key.rsplit("_b", 1)[0]
        doc.setdefault(key, {})[label(L)] = result if isinstance(result, str) else result.get(name)


def progress(row: str, kind: str, B: int, L: int, res: dict | str, seconds: float) -> str:
    """The line printed per cell (flushed: the GPU run is read while it runs)."""
    head = f"[{row}] {kind} b{B} {label(L)}:"
    if isinstance(res, str):
        return f"{head} {res} ({seconds:.1f} s)"
    if kind == "prefill":
        return f"{head} {fmt(res['prefill_tok_s'])} tok/s ({seconds:.1f} s)"
    return (f"{head} {fmt(res['decode_tok_s'])} tok/s, {res['step_ms']:.3f} ms/step (median "
            f"{res['step_ms_median']:.3f}), state {fmt(res['state_bytes'] / 2**20)} MiB, peak "
            f"{fmt(res['peak_gib'])} GiB, {fmt(res['gbps'])} GB/s ({res['bw_frac']:.1%} of copy), prefill "
            f"{res['prefill_s']:.2f} s, {graph_key(row)} +{res[graph_key(row)]} ({seconds:.1f} s)")


def save(path: Path, doc: dict) -> None:
    """Atomically: the parent may stop this process at any moment and reads what was saved last."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def child(a) -> None:
    """Build one row's model, then run its plan, saving the row after every item; a failed item is recorded
    and the next one runs."""
    import transformers

    row, t0 = a.child, time.perf_counter()
    path = Path(a.child_out) / f"row-{row}.json"
    done = json.loads(path.read_text()) if path.exists() else {}  # a restart after a fatal CUDA error
    dev = Dev(torch.device(a.device))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    model = build(row, SHAPES[a.shape], dev.device, dtype)
    run = Runner(row, model, dev, a)
    doc = {"device": dev.name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "env": {STATIC_ENV: os.environ.get(STATIC_ENV)}, "param_bytes": run.params, "copy_gbps": run.bandwidth,
           "startup_s": time.perf_counter() - t0}
    doc = {**done, **doc, "restarts": done.get("restarts", -1) + 1}
    print(f"[{row}] built in {doc['startup_s']:.1f} s: {fmt(run.params / 2**20)} MiB of parameters read per step, "
          f"copy bandwidth {fmt(run.bandwidth)} GB/s", flush=True)
    has_graphs = graph_count(row, model) is not None
    for kind, B, L in plan(row, a):
        if label(L) in done.get(cell_keys(row, kind, B)[0], {}):
            continue  # measured (or failed) before the restart
        t = time.perf_counter()
        fatal = False
        try:
            if kind == "prefill":
                with gpu_lock(a.gpu_lock):
                    res = run.prefill(L)
            else:
                res = run.decode(B, L)
        except Exception as e:  # an OOM or a kernel's failure costs this cell, not the row
            res, fatal = failure(e), is_fatal(e)
        if not fatal:
            dev.free()
        put(doc, row, kind, B, L, res)
        doc[graph_key(row)] = {**run.graphs, "retries": run.retries} if has_graphs else None
        doc["kernels"] = getattr(getattr(model, "student", None), "kernels", None)  # a student's mLSTM / sLSTM
        doc["seconds"] = time.perf_counter() - t0
        save(path, doc)
        print(progress(row, kind, B, L, res, time.perf_counter() - t), flush=True)
        if fatal:  # this process's CUDA context is gone: the parent restarts the row for the rest
            sys.exit(FATAL_RC)
    if dev.cuda and not is_teacher(row):
        with gpu_lock(a.gpu_lock):
            doc["step_profile"] = step_profile(model)
        save(path, doc)
        print(f"[{row}] one captured step: {json.dumps(doc['step_profile'])[:600]}", flush=True)


@contextlib.contextmanager
def gpu_lock(path: str | None):
    """Hold the GPU for timed work (--overlap): an exclusive lock on a file all rows' processes share, so no two rows
    measure at once while one row's compiles (CPU work) go on beside another's measurements. No path: no lock."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits while another row measures
        try:
            yield
        except BaseException as e:
            # What a failed section allocated (a teacher's half-built 80 GB static cache) is still held by its
            # traceback's frames: freed before the lock goes, or the next row's cell, granted the GPU, finds it
            # full (run3: three hybrid cells "oom" in 0.6 s right after teacher-static's 64 x 32k warm-up failed)
            traceback.clear_frames(e.__traceback__)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_fatal(e: BaseException) -> bool:
    """A CUDA error after which the process's context cannot run anything (an illegal memory access)."""
    text = str(e).lower()
    return type(e).__name__ == "AcceleratorError" or "illegal memory access" in text or "unspecified launch" in text


def step_profile(model, reps: int = 5, top: int = 12) -> dict | str:
    """What one captured decode step is made of (issue 22: what bounds it): at the largest batch <= 8 the row
    captured, its graph replayed alone (ms per replay, CUDA events), then under torch.profiler: kernels per step and
    the kernels taking most time, each with launches and microseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    decoders = {B: d for (B, _), d in getattr(model, "_static_decoders", {}).items() if d.graph is not None}
    if not decoders:
        return "no captured step"
    B = max((b for b in decoders if b <= 8), default=min(decoders))
    graph = decoders[B].graph
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [k for k in prof.key_averages() if k.device_type.name == "CUDA"]
    kernels.sort(key=lambda k: -k.self_device_time_total)
    return {"batch": B, "replay_ms_median": statistics.median(times),
            "kernels_per_step": sum(k.count for k in kernels) / reps,
            "kernel_us_per_step": sum(k.self_device_time_total for k in kernels) / reps,
            "top": [{"name": k.key[:90], "per_step": k.count / reps, "us_per_step": k.self_device_time_total / reps}
                    for k in kernels[:top]]}


# --- the parent: one process per row, within the budget ---------------------------------------------------------


def child_command(row: str, a, work: Path) -> list[str]:
    def csv(xs):
        return ",".join(str(x) for x in xs)

    cmd = [sys.executable, os.path.abspath(__file__), "--child", row, "--child-out", str(work),
           f"--shape={a.shape}", f"--device={a.device}", f"--dtype={a.dtype}", f"--steps={a.steps}",
           f"--lengths={csv(a.lengths)}", f"--student-lengths={csv(a.student_lengths)}",
           f"--eager-lengths={csv(a.eager_lengths)}", f"--batches={csv(a.batches)}", f"--eager-steps={a.eager_steps}",
           f"--long-batches={csv(a.long_batches)}"]
    if a.overlap:
        cmd.append(f"--gpu-lock={work / 'gpu.lock'}")
    return cmd + (["--cpu-compile"] if a.cpu_compile else [])


def row_env(row: str, overlap: bool = False) -> dict:
    """The row's process environment: unbuffered output, the students' decode path (static or eager), and with
    --overlap half the cores for teacher-static's compile workers (the other rows' host-bound decode loops keep
    theirs)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if overlap and row == "teacher-static":
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    if not is_teacher(row):
        env[STATIC_ENV] = "0" if row.endswith("-eager") else "1"
    return env


def kill_group(p: subprocess.Popen) -> None:
    """Stop a row's process and what it started (inductor's compile workers): its own process group."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


LIVE: set = set()
"""Row processes running now (one per --gpus lane): the parent stops them all if it is stopped itself."""
STOP = threading.Event()
"""Set when the parent is stopped: no lane starts another process."""


def run_row(row: str, a, work: Path, limit: float | None, gpu: int | None = None) -> dict:
    """Run one row's process for at most `limit` seconds; its saved row, with every planned cell it did not reach
    marked "not run: <why>". `gpu`: the one GPU the process sees (--gpus lanes), else all."""
    t0 = time.monotonic()
    if limit is not None and limit < MIN_ROW_S:
        status = f"not started: {limit:.0f} s of the budget left"
    else:
        print(f"== {row}: up to {'-' if limit is None else f'{limit:.0f}'} s", flush=True)
        # a process group of its own (same session): a stop at the time share ends its compile workers too
        try:
            for attempt in range(4):  # the first run and up to three restarts
                if STOP.is_set():
                    raise KeyboardInterrupt
                left = None if limit is None else limit - (time.monotonic() - t0)
                env = row_env(row, a.overlap)
                if gpu is not None:
                    env["CUDA_VISIBLE_DEVICES"] = str(gpu)
                p = subprocess.Popen(child_command(row, a, work), env=env, process_group=0)
                LIVE.add(p)
                try:
                    rc = p.wait(timeout=left)
                except BaseException:  # the share's end, Ctrl-C or SIGTERM: the row's group does not get them
                    kill_group(p)
                    raise
                finally:
                    LIVE.discard(p)
                status = "ok" if rc == 0 else f"exited {rc}"
                if rc != FATAL_RC or attempt == 3 or (left is not None and limit - (time.monotonic() - t0) < MIN_ROW_S):
                    break
                print(f"== {row}: restarted after a fatal CUDA error", flush=True)
        except subprocess.TimeoutExpired:
            status = f"stopped at its time share ({limit:.0f} s)"
    path = work / f"row-{row}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    for kind, B, L in plan(row, a):
        if label(L) not in doc.get(cell_keys(row, kind, B)[0], {}):
            put(doc, row, kind, B, L, f"not run: {status}")
    doc.update(status=status, wall_s=time.monotonic() - t0, limit_s=limit)
    print(f"== {row}: {status} after {doc['wall_s']:.0f} s", flush=True)
    return doc


def ratio(v, ref) -> float | None:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (v, ref))
    return v / ref if numbers and ref > 0 else None


def add_ratios(doc: dict) -> None:
    """x_teacher_static_b{B}: decode tokens/s over teacher-static's at the same cell; x_teacher_prefill: prefill
    tokens/s over the teacher's forward (teacher-eager's; the same forward as teacher-static's)."""
    rows = doc["rows"]
    ref = rows.get("teacher-static", {})
    pre = (rows.get("teacher-eager") or rows.get("teacher-static") or {}).get("prefill_tok_s", {})
    for r in rows.values():
        for B in doc["batches"]:
            theirs = ref.get(f"decode_tok_s_b{B}", {})
            r[f"x_teacher_static_b{B}"] = {c: ratio(v, theirs.get(c)) for c, v in r.get(f"decode_tok_s_b{B}", {}).items()}
        r["x_teacher_prefill"] = {c: ratio(v, pre.get(c)) for c, v in r.get("prefill_tok_s", {}).items()}


def plan_lanes(order: list[str], gpus: int, overlap: bool = False) -> list[list[str]]:
    """Rows per GPU for --gpus: each row, heaviest first, to the lane with the least ROW_WEIGHT so far; within a
    lane the rows keep RUN_ORDER. One lane (the whole order) for one GPU; with --overlap, teacher-static in a lane of
    its own beside the rest (its compiles beside their measurements)."""
    if overlap and gpus == 1 and "teacher-static" in order and len(order) > 1:
        return [["teacher-static"], [r for r in order if r != "teacher-static"]]
    lanes: list[list[str]] = [[] for _ in range(max(1, gpus))]
    for row in sorted(order, key=lambda r: -ROW_WEIGHT[r]):
        min(lanes, key=lambda ln: sum(ROW_WEIGHT[r] for r in ln)).append(row)
    return [[r for r in order if r in ln] for ln in lanes if ln]


def parent(a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="speed-rows-"))  # the rows' own files: DIR gets the three outputs only
    doc = {"device": None, "command": "python " + shlex.join(sys.argv), "torch": torch.__version__,
           "transformers": None, "shape": a.shape, "dtype": a.dtype, "steps": a.steps, "new_tokens": a.steps + 1,
           "eager_steps": a.eager_steps,
           "batches": a.batches, "lengths": [label(x) for x in a.lengths],
           "student_lengths": [label(x) for x in a.student_lengths],
           "eager_lengths": [label(x) for x in a.eager_lengths], "budget_s": a.budget, "rows": {}}
    deadline = time.monotonic() + a.budget if a.budget > 0 else None
    lanes = plan_lanes([r for r in RUN_ORDER if r in a.models], a.gpus, a.overlap)
    doc["lanes"] = lanes if len(lanes) > 1 else None
    doc["overlap"] = a.overlap
    lock = threading.Lock()

    def lane(gpu: int, order: list[str]) -> None:
        for i, row in enumerate(order):
            if STOP.is_set():
                return
            limit = None
            if deadline is not None:  # this row's weight in what is left, so time a row leaves goes to later ones
                limit = (deadline - time.monotonic()) * ROW_WEIGHT[row] / sum(ROW_WEIGHT[r] for r in order[i:])
            result = run_row(row, a, work, limit, gpu if a.gpus > 1 else None)  # --overlap: all on the one GPU
            with lock:
                for key in ("device", "transformers", "torch"):  # as the rows' processes saw them
                    doc[key] = result.get(key) or doc[key]
                doc["rows"][row] = result
                doc["rows"] = {r: doc["rows"][r] for r in ROWS if r in doc["rows"]}  # table order
                add_ratios(doc)
                (out / "speed.json").write_text(json.dumps(doc, indent=1))  # what ran so far
                (out / "speed.md").write_text(markdown(doc))

    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # raised in the join below
    try:
        threads = [threading.Thread(target=lane, args=(g, rows), daemon=True) for g, rows in enumerate(lanes)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # a timed join, so Ctrl-C and SIGTERM reach this (main) thread
                t.join(timeout=0.5)
    finally:  # stopped (Ctrl-C, SIGTERM) or done: no row's process group outlives the parent
        signal.signal(signal.SIGTERM, previous)
        STOP.set()
        for p in list(LIVE):
            kill_group(p)
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(doc), flush=True)
    plot(doc, out / "speed.png")


# --- speed.md and speed.png ----------------------------------------------------------------------------------------


def short(v) -> str:
    text = str(v).replace("|", "/")
    return text if len(text) <= 48 else text[:45] + "..."


def num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def all_contexts(doc: dict) -> list[str]:
    labels = {c for r in doc["rows"].values() for k, v in r.items()
              if k.startswith("decode_tok_s_b") or k == "prefill_tok_s" for c in v}
    return sorted(labels, key=count)


def markdown(doc: dict) -> str:
    rows = [r for r in ROWS if r in doc["rows"]]
    ctx = all_contexts(doc)
    head = "| row | " + " | ".join(ctx) + " |"
    sep = "|---|" + "---|" * len(ctx)
    bw = next((r["copy_gbps"] for r in doc["rows"].values() if r.get("copy_gbps")), None)
    lines = [f"# Inference speed: {doc['shape']}, {doc['dtype']}, {doc['device']}", "", f"`{doc['command']}`", "",
             f"torch {doc['torch']}, transformers {doc['transformers']}; each decode cell is one greedy generate() "
             f"of {doc['new_tokens']} tokens after a warm-up: tokens/s = batch x {doc['steps']} / the time of the "
             f"{doc['steps']} forwards after the first token (the prefill excluded; teacher-eager: "
             f"{doc.get('eager_steps', doc['steps'])} forwards). Copy bandwidth "
             f"{fmt(bw)} GB/s. Empty: not planned for that row; `not run`: out of its time share."]

    def cell(r, key, c):
        v = doc["rows"][r].get(key, {}).get(c)
        return "" if v is None and c not in doc["rows"][r].get(key, {}) else (short(v) if isinstance(v, str) else v)

    for B in doc["batches"]:
        lines += ["", f"## Decode tokens/s, batch {B} (x teacher-static)", "", head, sep]
        for r in rows:
            cells = []
            for c in ctx:
                v, x = cell(r, f"decode_tok_s_b{B}", c), doc["rows"][r].get(f"x_teacher_static_b{B}", {}).get(c)
                cells.append(v if isinstance(v, str) else fmt(v) + (f" ({x:.2f}x)" if x is not None else ""))
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines += ["", f"Batch {B}: median step ms / state MiB / peak GiB / achieved GB/s (fraction of copy bandwidth)",
                  "", head, sep]
        for r in rows:
            cells = []
            for c in ctx:
                v = cell(r, f"step_ms_median_b{B}", c)
                if isinstance(v, str):
                    cells.append(v)
                    continue
                get = lambda k: doc["rows"][r].get(f"{k}_b{B}", {}).get(c)  # noqa: E731
                state = get("state_bytes")
                cells.append(f"{num(v, '.3f')} / {fmt(state / 2**20 if state is not None else None)} / "
                             f"{num(get('peak_gib'), '.2f')} / {fmt(get('gbps'))} ({num(get('bw_frac'), '.1%')})")
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "## Prefill tokens/s, batch 1 (x the teacher's forward)", "", head, sep]
    for r in rows:
        cells = []
        for c in ctx:
            v, x = cell(r, "prefill_tok_s", c), doc["rows"][r].get("x_teacher_prefill", {}).get(c)
            cells.append(v if isinstance(v, str) else fmt(v) + (f" ({x:.2f}x)" if x is not None else ""))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "## Rows", "", "| row | status | seconds (share) | compiles (teacher) / CUDA-graph captures (students): "
              "warm-up, timed | kernels | TCACHE_STATIC_DECODE |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = doc["rows"][r]
        g = d.get("recompiles") if is_teacher(r) else d.get("captures")
        graphs = "-" if not g else f"{g['warmup']}, {g['timed']}" + (f" ({g['retries']} retried)" if g["retries"] else "")
        share = "-" if d.get("limit_s") is None else f"{d['limit_s']:.0f}"
        lines.append(f"| {r} | {short(d.get('status'))} | {num(d.get('wall_s'), '.0f')} ({share}) | {graphs} | "
                     f"{d.get('kernels') or '-'} | {(d.get('env') or {}).get(STATIC_ENV) or '-'} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Decode tokens/s and the generation state's memory against the context, one line per row, at batch 8 (or the
    largest batch below it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (python benchmarks/speed.py --replot DIR/speed.json draws it later)")
        return
    B = 8 if 8 in doc["batches"] else max([b for b in doc["batches"] if b <= 8] or doc["batches"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in [r for r in ROWS if r in doc["rows"]]:
        d = doc["rows"][r]
        style = "--" if r.endswith("-eager") else "-"
        for ax, key, scale in ((ax1, "decode_tok_s", 1), (ax2, "state_bytes", 2**-20)):
            pts = sorted((count(c), v * scale) for c, v in d.get(f"{key}_b{B}", {}).items()
                         if isinstance(v, (int, float)))
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=r)
    for ax, title, unit in ((ax1, f"decode throughput, batch {B}", "tokens / s"),
                            (ax2, f"generation state (KV cache / recurrent), batch {B}", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{doc['shape']}, {doc['dtype']}, {doc['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line ----------------------------------------------------------------------------------------------------


def counts(text: str | None) -> list[int]:
    return [count(x) for x in (text or "").split(",") if x.strip()]


def arguments(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-360m", choices=sorted(SHAPES))
    ap.add_argument("--models", default=",".join(DEFAULT_ROWS),
                    help=f"rows, comma-separated, of: {', '.join(ROWS)} (default: the first five)")
    ap.add_argument("--lengths", default="2k,8k,32k", help="contexts of every row")
    ap.add_argument("--student-lengths", default="128k", help="more contexts for the students (v2, hybrid, v1)")
    ap.add_argument("--eager-lengths", default=None,
                    help="contexts of the -eager student rows (default: the shortest of --lengths)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--long-batches", default="1,8",
                    help="batches at which the students also decode after --student-lengths (batch 64 x 128k would "
                         "prefill 8.4M tokens per student, ~100 s each)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per generate (steps + 1 new tokens)")
    ap.add_argument("--eager-steps", type=int, default=8,
                    help="timed steps of teacher-eager's cells (its steps take ~0.1 s, and the budget goes to the rows "
                         "the ratios compare)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--budget", type=float, default=500.0,
                    help="seconds for all rows together (0: no limit), shared by ROW_WEIGHT")
    ap.add_argument("--gpus", type=int, default=1,
                    help="run rows side by side, one process per GPU (rows split by ROW_WEIGHT; --budget is each "
                         "lane's): the default matrix needs ~800 s on one H200, more than one 10-minute call")
    ap.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                    help="on one GPU, run teacher-static beside the other rows: its compiles (CPU, ~50 s each) overlap "
                         "their measurements, and every timed section holds a GPU lock, so no two rows measure at "
                         "once (default: on for CUDA with --gpus 1)")
    ap.add_argument("--out", default="speed-out")
    ap.add_argument("--cpu-compile", action="store_true",
                    help="compile teacher-static's step on CPU as well (a dry run of what generate does on CUDA)")
    ap.add_argument("--replot", metavar="SPEED_JSON", help="only write speed.md and speed.png again from a speed.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--gpu-lock", default=None, help=argparse.SUPPRESS)  # --overlap's lock file, for a row process
    a = ap.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in a.models if m not in ROWS]
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)}; rows are {', '.join(ROWS)}")
    a.lengths, a.student_lengths, a.batches = counts(a.lengths), counts(a.student_lengths), counts(a.batches)
    a.long_batches = counts(a.long_batches)
    if a.overlap is None:
        a.overlap = a.device == "cuda" and a.gpus == 1
    if a.gpus < 1:
        ap.error(f"--gpus {a.gpus}: at least 1")
    if a.gpus > 1 and a.device == "cuda" and torch.cuda.device_count() < a.gpus:
        ap.error(f"--gpus {a.gpus}: this machine has {torch.cuda.device_count()} GPU(s); pass at most that many")
    if not a.lengths or not a.batches or a.steps < 1 or a.eager_steps < 1:
        ap.error("--lengths and --batches need at least one value, --steps at least 1")
    a.eager_lengths = counts(a.eager_lengths) if a.eager_lengths is not None else [min(a.lengths)]
    return a


def main() -> None:
    a = arguments()
    if a.replot:
        doc = json.loads(Path(a.replot).read_text())
        Path(a.replot).with_name("speed.md").write_text(markdown(doc))
        plot(doc, Path(a.replot).with_name("speed.png"))
    elif a.child:
        child(a)
    else:
        parent(a)


if __name__ == "__main__":
    main()
