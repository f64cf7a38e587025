"""Quality benchmark: teacher vs hybrid and Distil-xLSTM students vs baselines and ablations. One GPU call.

    python benchmarks/quality.py --teacher T --train TRAIN.jsonl.xz --valid VALID.jsonl --work DIR --out RESULTS
        [--heldout SET.jsonl.xz,...] [--heldout-tokens 400k]
    python benchmarks/quality.py --smoke        # the whole pipeline in minutes on a CPU (tiny budgets, one row)

1. `tcache build` over the whole training slice (seq_len 512, defaults otherwise); for the mixture rows (MIX_ROWS)
   also a cache of --mix-tokens over the slice and --mix-data (non-book text, benchmarks/mixture.py) at --mix-weights.
2. Students trained concurrently on the one GPU (each is launch-bound and leaves it mostly idle), all
   with the same seed and data, each followed by `tcache eval` on all of VALID at 512 and at 2048 tokens,
   and on each held-out set (--heldout, default benchmarks/data/heldout-*.jsonl.xz, at 512, --heldout-tokens each),
   and `tcache probe`'s recall at --probe-distances:
   Distil-xLSTM v1 and v2 (--tokens-per-run, --lr) and their CE-only baselines, a from-scratch xLSTM (CE
   only, random embedding and head), and the hybrid recipe (stage I --stage1-tokens, stage II
   --tokens-per-run, the recipe's learning rates) with its ablations: windows 16 / 32 / 64, no stage I,
   mLSTM only, window only (no mLSTM), stage II CE-only.
3. `tcache eval` and `tcache probe` of the teacher on the same windows, and of the untrained window cut for every
   window W the hybrid rows use (`cut-wW`: the teacher with its attention cut to W + 4 sinks, benchmarks/window_cut.py).
4. quality.json, quality.md and the markdown tables: perplexity at both lengths, x the teacher, log-gap closed vs
   the same architecture's CE-only baseline, tokens, wall time, tokens/s, peak GPU memory; then per set (VALID
   and each held-out set) perplexity, x the teacher and, for hybrid rows with a window, the recovery:
   (ln ppl_cut - ln ppl_student) / (ln ppl_cut - ln ppl_teacher), the share of the window cut's
   log-perplexity loss that the student wins back (the cut with the row's window; 0 = no better than the
   cut, 1 = the teacher); and each row's recall per distance (top-1 accuracy copying a span of random tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.env import ROOT, child_env, tcache, workdirs
from harness.rows import Budget, run_row
# quality_rows' and quality_tables' names are quality's too (tests/test_quality_tables.py reaches them as quality.X)
from quality_rows import CUT_SINKS, DEFAULT_RUNS, HELDOUT, LONG, MIX_DATA, MIX_ROWS, PRESETS, PROBE_DISTANCES, \
    ROW_ENV, RUNS, cut_name, cut_windows, describe, gap_closed, head_tokens, heldout_sets, ratio_to_teacher, \
    recovery, row_window, set_columns, set_name  # noqa: F401
from quality_tables import collect, tables, write_results  # noqa: F401

SHARED = Path(os.environ.get("TCACHE_SHARED", ROOT.parent / "shared"))  # the shared teacher and corpus (tests' too)
# --smoke: defaults for a CPU run of the whole pipeline in minutes (explicit flags still win)
SMOKE = {"teacher": str(SHARED / "teacher"), "train": str(SHARED / "corpus" / "train.jsonl.xz"),
         "work": "/tmp/tcache-quality-smoke/work",
         "out": "/tmp/tcache-quality-smoke/out", "build_tokens": "16k", "mix_tokens": "16k", "tokens_per_run": "2k",
         "stage1_tokens": "1k", "hybrid_batch": "2", "eval_tokens": "4k", "heldout_tokens": "4k",
         "runs": "hybrid", "deadline": 900.0}
REQUIRED = ("teacher", "train", "valid", "work", "out")
# --smoke without --valid: the head of the shared valid.jsonl (two books' first 40k characters, ~20k tokens), as
# every eval tokenises its whole file's first 4M characters: all of valid.jsonl for a few windows otherwise
SMOKE_VALID = (SHARED / "corpus" / "valid.jsonl", 2, 40_000)


# ---- the run ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true",
                    help=f"CPU smoke run: defaults {', '.join(f'{k}={v}' for k, v in SMOKE.items())}")
    ap.add_argument("--teacher", help="required (unless --smoke)")
    ap.add_argument("--train", help="required (unless --smoke)")
    ap.add_argument("--valid", help="required (unless --smoke)")
    ap.add_argument("--work", help="required (unless --smoke)")
    ap.add_argument("--out", help="required (unless --smoke)")
    ap.add_argument("--build-tokens", default="100M", help="budget; the slice holds ~14M, all of it is cached")
    ap.add_argument("--tokens-per-run", default="5M", help="the hybrid's stage II budget too")
    ap.add_argument("--stage1-tokens", default="2.5M", help="the hybrid's stage I budget")
    ap.add_argument("--hybrid-batch", default="16", help="rows per step of the hybrid runs (no accumulation)")
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--eval-tokens", default="2M", help="more than VALID holds: all of it is scored")
    ap.add_argument("--heldout", default=",".join(HELDOUT),
                    help="comma-separated held-out sets scored at 512 tokens per window ('' for none)")
    ap.add_argument("--heldout-tokens", default="400k", help="tokens per held-out set (each holds ~400k)")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                    help=f"comma-separated rows, or a preset ({', '.join(PRESETS)}: issue 24's variants and frontier)")
    ap.add_argument("--mix-data", default=str(MIX_DATA), help="the other text the mixture rows also train on")
    ap.add_argument("--mix-weights", default="0.75,0.25", help="--train's and --mix-data's shares of the mixture cache")
    ap.add_argument("--mix-tokens", default="8M",
                    help="the mixture cache's budget: more than the rows train on (--mix-data holds ~2M tokens)")
    ap.add_argument("--probe-distances", default=PROBE_DISTANCES, help="the recall probe's distances (tcache probe)")
    ap.add_argument("--grad-accum", default="4")
    ap.add_argument("--deadline", type=float, default=560, help="seconds; unfinished runs are killed (0: no deadline)")
    ap.add_argument("--collect-only", action="store_true", help="only rebuild the results from --work")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--smoke", action="store_true")
    if pre.parse_known_args(argv)[0].smoke:
        ap.set_defaults(**SMOKE)
    a = ap.parse_args(argv)
    a.valid_head = None
    if a.smoke and a.valid is None:
        a.valid = str(Path(a.work) / "valid-head.jsonl")
        a.valid_head = SMOKE_VALID
    missing = [f"--{k}" for k in REQUIRED if getattr(a, k) is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")
    return a


def write_head(src: Path, dst: Path, docs: int, chars: int) -> None:
    """The first `chars` characters of the first `docs` documents of JSONL `src`, as JSONL `dst`."""
    with open(src) as f:
        heads = [json.loads(next(f))["text"][:chars] for _ in range(docs)]
    dst.write_text("".join(json.dumps({"text": h}) + "\n" for h in heads))



def build_cache(a, cache: Path, data: list[str], tokens: str, log_path: Path, env: dict) -> dict:
    """`tcache build` of `tokens` over `data` (--data flags) into `cache`; the build's numbers."""
    t = time.time()
    with open(log_path, "w") as log:
        rc = run_row(tcache("build", "--teacher", a.teacher, *data, "--tokens", tokens, "--out", cache,
                            "--batch-size", "64", "--overwrite"), None, env, log, subprocess.STDOUT).rc
    if rc != 0:
        raise SystemExit(f"tcache build exited {rc}; its output is in {log_path}")
    manifest = json.loads((cache / "manifest.json").read_text())
    build = {"wall_s": round(time.time() - t, 1), "tokens": manifest["tokens"], **manifest["build"]}
    print(f"build {cache.name}: {build['tokens']:,} tokens in {build['wall_s']} s ({build['tokens_per_s']:,.0f} "
          "tok/s in the loop)", flush=True)
    return build


def main() -> None:
    a = parse_args()
    names = [m for n in a.runs.split(",") if n for m in PRESETS.get(n, [n])]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join([*PRESETS, *RUNS])}")
    cuts = [cut_name(w) for w in cut_windows(names)]
    if a.collect_only:
        m = json.loads((Path(a.work) / "cache" / "manifest.json").read_text())
        result = collect(Path(a.work), names + cuts, a, {"tokens": m["tokens"], **m["build"]}, 0.0)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        write_results(Path(a.out), result)
        return
    t0 = time.time()
    budget = Budget(a.deadline)  # every job's processes are stopped at the deadline
    work, out = workdirs(a)
    if a.valid_head:
        write_head(a.valid_head[0], Path(a.valid), *a.valid_head[1:])
    env = child_env()

    # 1. build: the books' cache, and the mixture's when a row trains on it
    cache = work / "cache"
    build = build_cache(a, cache, ["--data", a.train], a.build_tokens, out / "build.log", env)
    if MIX_ROWS & set(names):
        build["mixture"] = build_cache(a, work / "cache-mix", ["--data", a.train, "--data", a.mix_data,
                                                               "--data-weights", a.mix_weights],
                                       a.mix_tokens, out / "build-mix.log", env)

    # 2. + 3. students, the window cuts and the teacher eval, concurrently (one thread per job, each running
    # subprocesses)
    sets = heldout_sets(a)
    head = str(head_tokens(a))

    def run(cmd: list[str], log: Path, stdout=None, row: str | None = None) -> int:
        with open(log, "a") as lf:
            left = budget.left()  # None: --deadline 0, no limit
            r = run_row(cmd, None if left is None else max(left, 1), {**env, **ROW_ENV.get(row, {})}, stdout or lf,
                        lf)
        if r.timed_out:
            print(f"{log.stem}: killed at the deadline", flush=True)
            return -9
        return r.rc

    def student(name: str) -> None:
        recipe, extra, _ = RUNS[name]
        run_dir = work / name
        t = time.time()
        if recipe == "hybrid":  # the recipe's own learning rates, one stage I budget
            knobs = ["--stage1-tokens", a.stage1_tokens, "--batch-size", a.hybrid_batch, "--grad-accum", "1"]
        else:
            knobs = ["--lr", a.lr, "--grad-accum", a.grad_accum]
        rc = run(tcache("distill", str(work / "cache-mix" if name in MIX_ROWS else cache), "--out", str(run_dir), "--recipe", recipe, "--tokens",
                        a.tokens_per_run, *knobs, "--seed", "0", "--workers", "1", "--overwrite",
                        *[x.format(teacher=a.teacher) for x in extra]), out / f"{name}.log", row=name)
        if rc == 0:
            # beside the run, not in it: a run directory holds only what tcache writes (--overwrite checks)
            (work / f"{name}.wall.json").write_text(json.dumps({"distill_wall_s": round(time.time() - t, 1)}))
            evaluate(str(run_dir), name)

    def window_cut(name: str) -> None:
        # a fresh directory each time: the cut is rewritten from --teacher, never reused from an earlier run
        cut_dir = work / name
        if cut_dir.exists():
            shutil.rmtree(cut_dir)
        window = describe(name)[1][1]
        if run([sys.executable, str(ROOT / "benchmarks" / "window_cut.py"), "--teacher", a.teacher, "--window",
                window, "--sinks", str(CUT_SINKS), "--out", str(cut_dir)], out / f"{name}.log") == 0:
            evaluate(str(cut_dir), name)

    def evaluate(model: str, name: str) -> None:
        jobs = [("", a.valid, "512", a.eval_tokens), (".long", a.valid, str(LONG), a.eval_tokens),
                (".head", a.valid, "512", head)]
        jobs += [(f".heldout-{s}", path, "512", a.heldout_tokens) for s, path in sets.items()]
        for suffix, data, seq_len, tokens in jobs:
            with open(work / f"{name}.eval{suffix}.json.partial", "w") as f:
                if run(tcache("eval", model, "--data", data, "--tokens", tokens, "--seq-len", seq_len,
                              "--batch-size", "8" if seq_len == "512" else "2", "--json"),
                       out / f"{name}.log", stdout=f, row=name) == 0:
                    os.replace(work / f"{name}.eval{suffix}.json.partial", work / f"{name}.eval{suffix}.json")
        with open(work / f"{name}.probe.json.partial", "w") as f:  # recall at distances beyond the window
            if run(tcache("probe", model, "--distances", a.probe_distances, "--json"), out / f"{name}.log",
                   stdout=f, row=name) == 0:
                os.replace(work / f"{name}.probe.json.partial", work / f"{name}.probe.json")

    def teacher_job() -> None:
        evaluate(a.teacher, "teacher")

    with ThreadPoolExecutor(len(names) + len(cuts) + 1) as pool:
        futures = ([pool.submit(student, n) for n in names] + [pool.submit(window_cut, n) for n in cuts]
                   + [pool.submit(teacher_job)])
        for f in futures:
            f.result()

    # 4. results
    result = collect(work, names + cuts, a, build, time.time() - t0)
    write_results(out, result)


if __name__ == "__main__":
    main()
