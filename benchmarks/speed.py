"""Decode and prefill speed of the students against their teacher, each served through transformers' generate()
(issues 22 and 36). One process per row, driven by a parent that writes DIR/speed.json, DIR/speed.md and DIR/speed.png:

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
    v2, hybrid, v1  the exported student class (TcacheStudentForCausalLM, via to_hf) with its static decoder
                    (tcache.student.inference.decode.StaticDecoder, the one decode path): on CUDA its step captured
                    in a CUDA graph replayed per token, compiled as TCACHE_STATIC_COMPILE says (default layer); on
                    CPU the same static buffers run uncaptured
    v2-eager, ...   (only when --models names them) the same static step eager: TCACHE_CUDA_GRAPH=0 and
                    TCACHE_STATIC_COMPILE=off in the row's process (no capture, no compile); only at
                    --eager-lengths (default the shortest --lengths: a student's step does not depend on the prefix,
                    and the GPU run's time goes to the rows that do)

Each decode cell (context L, batch B) is timed end to end through generate(), every row alike
(harness/decode_timing.py): after a warm-up generate at batch B (for teacher-static at the cell's exact static-cache
shape, so its compile and CUDA-graph recording happen there) and one untimed generate(1) at (B, L) (the prefill's
memory obtained outside the clock), generate(prompt (B, L), 1 new token) and generate(prompt, 1 + N new tokens),
N = --steps, are each timed whole: torch.cuda.synchronize before and after each call, none inside, and nothing of
ours in the loop (no logits processor, no stopping criterion, no per-step event). Every call is greedy, with the
prompt's attention mask (all ones, as a tokenizer returns it) and eos_token_id=None, so it makes exactly its tokens.
Where the prefill takes under a second, --reps pairs (default 3) and each call's median. Per cell:

    decode_tok_s         B * N / (t(1 + N) - t(1)): the N decode forwards, generate's per-token work included
    step_ms              (t(1 + N) - t(1)) / N, the mean step seen end to end (= B / decode_tok_s)
    prefill_s            t(1): prefill + first token, the part subtracted
    prefill_over_decode  t(1) / (t(1 + N) - t(1)): how large the subtracted part was against the decode (at B x L in
                         the millions the prefill can be ~100x the decode: the rate is then a small difference of two
                         large times); decode_spread: (max - min) / median of the pairs' differences, with --reps > 1
    t1_s, tn_s           every timed call's seconds; reps the pairs
    state_bytes          the returned cache: KV (teacher's static or dynamic cache) or the student's state .nbytes()
    peak_gib             torch.cuda.max_memory_allocated over generate(1 + N) (prefill_peak_gib: over generate(1))
    gbps, bw_frac        (parameters read + state bytes) / step_ms, and its fraction of this device's copy bandwidth
    recompiles           teacher rows: torch._dynamo graphs compiled during the timed calls (must be 0)
    captures             students: model.static_decode_captures added during the timed calls (must be 0)

Kernels per step come from a separate profiled pair, after the timed calls of one cell per row (the largest batch
<= 8 at the row's shortest context): generate(1) and generate(1 + --profile-steps) under torch.profiler, their
difference per step (speed.json's rows.ROW.decode_profile): kernels_per_step (CUDA device activities per generated
token, memcpy / memset included), kernel_us_per_step, the top kernels; on CPU cpu_ops_per_step (aten ops the model
calls) and no kernels. profiled_step_ms is that pair's wall time per step under the profiler, not a rate. The
students' step_profile (CUDA) is their captured graph replayed alone.

Prefill tokens/s is one forward (use_cache=True, logits_to_keep=1, as generate's prefill) at batch 1 per context,
after a warm-up at that length. Ratios: every row's decode tokens/s over teacher-static's at the same cell, prefill
over teacher-eager's forward.

--overlap (the default on one GPU): teacher-static's process runs beside the other rows' (one after another), so its
compiles, CPU work of ~50 s each, overlap their measurements; every timed section (a prefill cell's two forwards, a
decode cell's timed generate calls and its profiled pair, the step profile) holds a lock on the GPU, so no two rows
ever measure at once. The warm-ups (4 tokens at a 64-token prompt) run outside it. The students decode after
--student-lengths at --long-batches only (default 1,8).

The decode method until issue 36 stamped every token with a logits processor inside one generate() (prefill and
decode split at the first token): the committed tables in benchmarks/results/speed-h200-static were measured so.

Time: --budget seconds for all rows together, shared by ROW_WEIGHT; a row's process is stopped at its share (what
it measured is kept: it saves after every cell) and its cells run cheapest first (fewest prompt tokens), so a row
out of time loses its largest cells, which speed.json names as "not run". If a model runs out of memory the cell
says "oom" and the row goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from harness.env import child_env, command, versions
from harness.results import fmt, write_json
from harness.rows import STOP, Budget, run_row, stoppable
from harness.timing import Dev
from speed_measure import Runner, failure, gpu_lock, is_fatal, step_profile
from speed_models import DEFAULT_ROWS, ROWS, SHAPES, build, count, graph_count, graph_key, is_teacher, label
from speed_report import add_ratios, markdown, plot

RUN_ORDER = ("teacher-static", "v2", "hybrid", "hybrid-joint", "teacher-eager", "v2-eager", "hybrid-eager", "v1-eager",
             "v1")
"""Process order: teacher-static first (every ratio's reference, and its compiles), then the students whose ratios
are the point; v1 last, since its sLSTM prefill is a loop over the prompt that spends whatever it is given."""
ROW_WEIGHT = {"teacher-static": 200, "teacher-eager": 45, "v2": 110, "hybrid": 120, "hybrid-joint": 120, "v1": 110,
              "v2-eager": 30, "hybrid-eager": 40, "v1-eager": 30}
"""Share of --budget per row: estimated seconds of the GPU run (H200, smollm2-360m, the default cells), ~15 s of
each for imports and the build. teacher-static: 3 compiles of 40-60 s each (transformers' default CompileConfig has
automatic dynamic shapes: a static graph, then one with the cache length dynamic, then the batch) and ~3M prompt
tokens; v2 and the hybrid: one CUDA-graph capture per batch (~15 s) and ~4M prompt tokens at ~80k tokens/s (batch
64 x 128k would be 8.4M more: not in --long-batches' default); v1 the same, its sLSTM prefill on xlstm's CUDA cells
(student/inference/slstm_cuda.py: ~22 s of nvcc first); teacher-eager: --eager-steps eager steps of ~0.1 s per cell. With
--overlap, teacher-static's lane has the whole budget and the other rows share it by these weights."""
EAGER_ENV = {"TCACHE_CUDA_GRAPH": "0", "TCACHE_STATIC_COMPILE": "off"}
"""The -eager student rows' process environment: the static decoder's step, neither captured nor compiled."""
METHOD = "end-to-end: (t(generate 1 + N) - t(generate 1)) / N, synchronised around each whole call only"
"""speed.json's `method`: how its decode cells were timed (earlier files, without it, stamped every token)."""
DECODE_ENV = ("TCACHE_CUDA_GRAPH", "TCACHE_STATIC_COMPILE", "TCACHE_FUSED_STEP")
"""The variables that choose how a student's decode step runs, recorded per row (speed.json's `env`)."""
FATAL_RC = 3
"""A row's process exits with this after a CUDA error that leaves its context unusable (an illegal memory access):
the parent starts it again for the cells it has not reached, if the row's share has time left."""
MIN_ROW_S = 20.0
"""A row's process is not started with less time than this: importing and building take ~10 s."""
DECODE_KEYS = ("decode_tok_s", "step_ms", "decode_s", "prefill_s", "prefill_over_decode", "decode_spread", "reps",
               "t1_s", "tn_s", "warm_prefill_s", "state_bytes", "peak_gib", "prefill_peak_gib", "bytes_per_step",
               "gbps", "bw_frac")
"""Per-cell keys, each `{key}_b{B}` mapping a context label to a number (or the cell's "oom" / "failed: ..." /
"not run: ..." string); plus recompiles_b{B} (teacher rows) or captures_b{B} (students)."""


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


def profile_cell(row: str, a) -> tuple[int, int] | None:
    """The decode cell (B, L) whose step the row profiles after timing it: the largest batch up to 8 (the issue's
    targets are at batch 8) at the row's shortest context; the profile's kernel count does not depend on the
    context. None with --profile-steps 0."""
    if not a.profile_steps:
        return None
    B = max([b for b in a.batches if b <= 8] or [min(a.batches)])
    return B, min(contexts(row, a, B))


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
    spread = "" if res["decode_spread"] is None else f", spread {res['decode_spread']:.1%}"
    return (f"{head} {fmt(res['decode_tok_s'])} tok/s, {fmt(res['step_ms'])} ms/step, prefill {res['prefill_s']:.3f} s "
            f"= {fmt(res['prefill_over_decode'])}x the decode ({res['reps']} pair(s){spread}), state "
            f"{fmt(res['state_bytes'] / 2**20)} MiB, peak {fmt(res['peak_gib'])} GiB, {fmt(res['gbps'])} GB/s "
            f"({fmt(res['bw_frac'])} of copy), {graph_key(row)} +{res[graph_key(row)]} ({seconds:.1f} s)")


def child(a) -> None:
    """Build one row's model, then run its plan, saving the row after every item; a failed item is recorded
    and the next one runs."""
    row, t0 = a.child, time.perf_counter()
    path = Path(a.child_out) / f"row-{row}.json"
    done = json.loads(path.read_text()) if path.exists() else {}  # a restart after a fatal CUDA error
    dev = Dev(torch.device(a.device))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    model = build(row, SHAPES[a.shape], dev.device, dtype)
    run = Runner(row, model, dev, a)
    run.profile_cell = profile_cell(row, a)
    doc = {"device": dev.name(), **versions(), "env": {k: os.environ.get(k) for k in DECODE_ENV},
           "param_bytes": run.params, "copy_gbps": run.bandwidth,
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
        doc["decode_profile"] = run.profile if run.profile is not None else done.get("decode_profile")
        doc["seconds"] = time.perf_counter() - t0
        write_json(path, doc, indent=1)
        print(progress(row, kind, B, L, res, time.perf_counter() - t), flush=True)
        if fatal:  # this process's CUDA context is gone: the parent restarts the row for the rest
            sys.exit(FATAL_RC)
    if dev.cuda and not is_teacher(row):
        with gpu_lock(a.gpu_lock):
            doc["step_profile"] = step_profile(model)
        write_json(path, doc, indent=1)
        print(f"[{row}] one captured step: {json.dumps(doc['step_profile'])[:600]}", flush=True)


# --- the parent: one process per row, within the budget ---------------------------------------------------------


def child_command(row: str, a, work: Path) -> list[str]:
    def csv(xs):
        return ",".join(str(x) for x in xs)

    cmd = [sys.executable, os.path.abspath(__file__), "--child", row, "--child-out", str(work),
           f"--shape={a.shape}", f"--device={a.device}", f"--dtype={a.dtype}", f"--steps={a.steps}",
           f"--lengths={csv(a.lengths)}", f"--student-lengths={csv(a.student_lengths)}",
           f"--eager-lengths={csv(a.eager_lengths)}", f"--batches={csv(a.batches)}", f"--eager-steps={a.eager_steps}",
           f"--long-batches={csv(a.long_batches)}", f"--reps={a.reps}", f"--profile-steps={a.profile_steps}"]
    if a.overlap:
        cmd.append(f"--gpu-lock={work / 'gpu.lock'}")
    return cmd + (["--cpu-compile"] if a.cpu_compile else [])


def row_env(row: str, overlap: bool = False) -> dict:
    """The row's process environment: unbuffered output, an -eager student's uncaptured and uncompiled step, and with
    --overlap half the cores for teacher-static's compile workers (the other rows' host-bound decode loops keep
    theirs)."""
    env = child_env(**(EAGER_ENV if row.endswith("-eager") else {}))
    if overlap and row == "teacher-static":
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    return env


def row_process(row: str, a, work: Path, limit: float | None, gpu: int | None = None) -> dict:
    """Run one row's process for at most `limit` seconds; its saved row, with every planned cell it did not reach
    marked "not run: <why>". `gpu`: the one GPU the process sees (--gpus lanes), else all."""
    t0 = time.monotonic()
    if limit is not None and limit < MIN_ROW_S:
        status = f"not started: {limit:.0f} s of the budget left"
    else:
        print(f"== {row}: up to {'-' if limit is None else f'{limit:.0f}'} s", flush=True)
        env = row_env(row, a.overlap)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        for attempt in range(4):  # the first run and up to three restarts
            left = None if limit is None else limit - (time.monotonic() - t0)
            r = run_row(child_command(row, a, work), left, env)
            status = f"stopped at its time share ({limit:.0f} s)" if r.timed_out else r.status
            if r.rc != FATAL_RC or attempt == 3 or (left is not None and limit - (time.monotonic() - t0) < MIN_ROW_S):
                break
            print(f"== {row}: restarted after a fatal CUDA error", flush=True)
    path = work / f"row-{row}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    for kind, B, L in plan(row, a):
        if label(L) not in doc.get(cell_keys(row, kind, B)[0], {}):
            put(doc, row, kind, B, L, f"not run: {status}")
    doc.update(status=status, wall_s=time.monotonic() - t0, limit_s=limit)
    print(f"== {row}: {status} after {doc['wall_s']:.0f} s", flush=True)
    return doc


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
    doc = {"device": None, "command": command(), "torch": torch.__version__, "transformers": None, "shape": a.shape,
           "dtype": a.dtype, "steps": a.steps, "new_tokens": a.steps + 1,
           "eager_steps": a.eager_steps, "method": METHOD, "reps": a.reps, "profile_steps": a.profile_steps,
           "batches": a.batches, "lengths": [label(x) for x in a.lengths],
           "student_lengths": [label(x) for x in a.student_lengths],
           "eager_lengths": [label(x) for x in a.eager_lengths], "budget_s": a.budget, "rows": {}}
    budget = Budget(a.budget)
    lanes = plan_lanes([r for r in RUN_ORDER if r in a.models], a.gpus, a.overlap)
    doc["lanes"] = lanes if len(lanes) > 1 else None
    doc["overlap"] = a.overlap
    lock = threading.Lock()

    def lane(gpu: int, order: list[str]) -> None:
        for i, row in enumerate(order):
            if STOP.is_set():
                return
            limit = budget.share(ROW_WEIGHT[row], sum(ROW_WEIGHT[r] for r in order[i:]))
            result = row_process(row, a, work, limit, gpu if a.gpus > 1 else None)  # --overlap: all on the one GPU
            with lock:
                for key in ("device", "transformers", "torch"):  # as the rows' processes saw them
                    doc[key] = result.get(key) or doc[key]
                doc["rows"][row] = result
                doc["rows"] = {r: doc["rows"][r] for r in ROWS if r in doc["rows"]}  # table order
                add_ratios(doc)
                write_json(out / "speed.json", doc, indent=1)  # what ran so far
                (out / "speed.md").write_text(markdown(doc))

    try:
        with stoppable():  # SIGTERM raises in the join below; no row's process group outlives the parent
            threads = [threading.Thread(target=lane, args=(g, rows), daemon=True) for g, rows in enumerate(lanes)]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():  # a timed join, so Ctrl-C and SIGTERM reach this (main) thread
                    t.join(timeout=0.5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(doc), flush=True)
    plot(doc, out / "speed.png")


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
    ap.add_argument("--reps", type=int, default=3,
                    help="timed pairs of generate(1) and generate(1 + steps) per decode cell whose prefill is short "
                         "(speed_measure.REPEAT_BELOW_S); each call's median is taken. Other cells: one pair")
    ap.add_argument("--profile-steps", type=int, default=4,
                    help="decode steps of each row's profiled pair (kernels per step), at its profile cell; 0: none")
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
    if not a.lengths or not a.batches or a.steps < 1 or a.eager_steps < 1 or a.reps < 1 or a.profile_steps < 0:
        ap.error("--lengths and --batches need at least one value, --steps and --reps at least 1, --profile-steps "
                 "at least 0")
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