"""One speed.py row's measurements, in its own process: prefill tokens/s, decode tokens/s timed end to end as
generate(1 + N) minus generate(1) (harness/decode_timing.py) with one profiled pair per row; the GPU lock that keeps
rows from measuring at once, and a profile of one captured student step."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import statistics
import time
import traceback

import torch

from harness.decode_timing import decode_rate, profile_decode, timed_call
from harness.results import failure as describe_failure
from harness.timing import Dev
from speed_models import added, graph_count, graph_key, is_teacher, kv_bytes, param_bytes_read, state_bytes

WARM_PROMPT = 64
"""Prompt tokens of the warm-up generate: the decode step's shapes do not depend on it (the static cache's length is
set explicitly), and it is longer than the hybrid's window + sinks."""
WARM_NEW_TOKENS = 4
"""Tokens of the warm-up generate: three decode steps compile teacher-static's step, run its CUDA-graph tree's
warm-up and record it (the static cache's length is stated, so not the token count but cache_len sets the shapes);
a student captures at its first step. Few, so a warm-up beside another row's measurement (--overlap) barely touches
the GPU."""
REPEAT_BELOW_S = 1.0
"""A decode cell whose prefill (its first timed generate(1)) takes less than this is timed as a.reps pairs, each call's
median taken; a longer one as one pair (its prefill, three times more per pair, would take the row's time share)."""
LOCKED_WARM_UP_BYTES = 8 * 2**30
"""A teacher's warm-up whose KV cache is larger than this holds the GPU lock (--overlap)."""


def random_ids(B: int, L: int, vocab: int, dev: Dev) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * B + L)
    return torch.randint(0, vocab, (B, L), generator=g).to(dev.device)  # (B, L)


@torch.no_grad()
def generate(model, row: str, ids: torch.Tensor, new_tokens: int, cache_len: int, cpu_compile: bool = False):
    """generate() as the row's users call it: the prompt with its attention mask (all ones, as a tokenizer returns
    it), greedy, and nothing else of ours in the loop (no logits processor, no stopping criterion). Exactly new_tokens
    tokens, since eos_token_id=None leaves generate nothing to stop at (min_new_tokens would add a logits processor
    that masks eos at every step). The output carries the cache (its bytes are measured; no scores are kept).
    teacher-static: transformers' static cache, compiled by generate itself with its default CompileConfig on CUDA;
    its length stated (a user serving a fixed budget does the same), so the warm-up with a short prompt compiles the
    step at the timed calls' shapes and generate(1) and generate(1 + N) allocate the same cache."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=torch.ones_like(ids), return_dict_in_generate=True)  # mask (B, L)
    if row == "teacher-static":
        kw.update(cache_implementation="static", max_cache_len=cache_len)
        if cpu_compile:  # transformers' switch for compiling on CPU too (a dry run of the GPU's compile path)
            from transformers import CompileConfig

            cc = CompileConfig()
            cc._compile_all_devices = True
            kw["compile_config"] = cc
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
        self.bandwidth = dev.copy_gbps()
        self.graphs = {"warmup": 0, "timed": 0}
        self.retries = 0
        self.profile_cell: tuple[int, int] | None = None  # (B, L) whose decode is profiled after its timed calls
        self.profile: dict | str | None = None

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

    def gen(self, ids: torch.Tensor, L: int):
        """n -> generate(ids, n new tokens) at this cell: every call (timed, untimed, profiled) with the same static
        cache length, so none of them compiles or allocates a cache shape the others do not."""
        return lambda n: generate(self.model, self.row, ids, n, L + self.new_tokens, self.a.cpu_compile)

    def timed(self, ids: torch.Tensor, L: int) -> dict:
        """The timed calls at one cell: generate(1) once untimed, then pairs of generate(1) and generate(1 + steps),
        each call timed whole (decode_timing.timed_call). The untimed call runs this cell's prefill first, so the
        allocator's blocks for it (and a student's kernels built for this prompt length) are obtained there and not
        inside the first timed generate(1), which would then be slower than its twin inside generate(1 + steps) and
        leave the difference short. The first timed generate(1) picks the pairs: a.reps where it takes under
        REPEAT_BELOW_S, else one."""
        gen, dev, B = self.gen(ids, L), self.dev, ids.shape[0]
        first, out = timed_call(lambda: gen(1), dev)
        check_generated(self.row, out, B, L, 1)
        del out
        before = graph_count(self.row, self.model)
        t1, tn, peaks, prefill_peaks = [], [], [], []
        while not t1 or len(t1) < (self.a.reps if t1[0] < REPEAT_BELOW_S else 1):  # pairs after the first one's t1
            for n, times, high in ((1, t1, prefill_peaks), (self.new_tokens, tn, peaks)):
                dev.reset_peak()
                seconds, out = timed_call(lambda: gen(n), dev)
                check_generated(self.row, out, B, L, n)
                times.append(seconds)
                high.append(dev.peak_gib())
                if n > 1:
                    state = state_bytes(returned_cache(out))
                del out  # its cache, before the next call allocates another
        new_graphs = added(before, graph_count(self.row, self.model))
        self.graphs["timed"] += new_graphs or 0
        return {**decode_rate(B, self.new_tokens - 1, t1, tn), "state_bytes": state, "warm_prefill_s": first,
                "peak_gib": None if None in peaks else max(peaks),
                "prefill_peak_gib": None if None in prefill_peaks else max(prefill_peaks),
                graph_key(self.row): new_graphs}

    def decode(self, B: int, L: int) -> dict:
        """The decode cell (B, L), timed end to end after the warm-up (decode_timing.decode_rate); at the row's
        profile cell, then the profiled pair (profile_decode), apart from the timed calls."""
        self.warm_up(B, L)
        ids = random_ids(B, L, self.vocab, self.dev)
        with gpu_lock(self.a.gpu_lock):
            res = self.timed(ids, L)
            if res[graph_key(self.row)]:  # it compiled or captured: that time is not a decode step's, so once more
                self.retries += 1
                res = self.timed(ids, L)
            if (B, L) == self.profile_cell:
                self.profile = self.profiled(ids, L)
        read = self.params + res["state_bytes"]  # one step reads every parameter and the whole state (a teacher: KV)
        gbps = read / res["step_ms"] / 1e6 if res["step_ms"] else None  # bytes per ms / 1e6 = GB/s
        return {**res, "bytes_per_step": read, "gbps": gbps,
                "bw_frac": gbps / self.bandwidth if gbps is not None else None}

    def profiled(self, ids: torch.Tensor, L: int) -> dict | str:
        """The row's decode step under torch.profiler at this cell (decode_timing.profile_decode), with the cell and
        the graphs compiled or captured meanwhile (0 expected: the cell is warm); a failure is recorded, not raised."""
        steps = min(self.a.profile_steps, self.new_tokens - 1)  # within the static cache the timed calls used
        before = graph_count(self.row, self.model)
        try:
            prof = profile_decode(self.gen(ids, L), self.dev, steps)
        except Exception as e:  # the profile is extra: its failure costs neither the cell nor the row
            return failure(e)
        return {"batch": ids.shape[0], "context": L, **prof,
                graph_key(self.row): added(before, graph_count(self.row, self.model))}


def failure(e: BaseException) -> str:
    """A cell's failure as speed.json records it: "oom", or the exception's first line."""
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).strip().split("\n")[0].lower():
        return "oom"
    return f"failed: {describe_failure(e, 160)}"



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

