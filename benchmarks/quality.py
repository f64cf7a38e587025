"""Quality benchmark: teacher vs hybrid and Distil-xLSTM students vs baselines and ablations. One GPU call.

    python benchmarks/quality.py --teacher T --train TRAIN.jsonl.xz --valid VALID.jsonl --work DIR --out RESULTS
        [--heldout SET.jsonl.xz,...] [--heldout-tokens 400k]
    python benchmarks/quality.py --smoke        # the whole pipeline in minutes on a CPU (tiny budgets, one row)

1. `tcache build` over the whole training slice (seq_len 512, defaults otherwise).
2. Students trained concurrently on the one GPU (each is launch-bound and leaves it mostly idle), all
   with the same seed and data, each followed by `tcache eval` on all of VALID at 512 and at 2048 tokens,
   and on each held-out set (--heldout, default benchmarks/data/heldout-*.jsonl.xz, at 512, --heldout-tokens each):
   Distil-xLSTM v1 and v2 (--tokens-per-run, --lr) and their CE-only baselines, a from-scratch xLSTM (CE
   only, random embedding and head), and the hybrid recipe (stage I --stage1-tokens, stage II
   --tokens-per-run, the recipe's learning rates) with its ablations: windows 16 / 32 / 64, no stage I,
   mLSTM only, window only (no mLSTM), stage II CE-only.
3. `tcache eval` of the teacher on the same windows, and of the untrained window cut for every window W the
   hybrid rows use (`cut-wW`: the teacher with its attention cut to W + 4 sinks, benchmarks/window_cut.py).
4. quality.json, quality.md and the markdown tables: perplexity at both lengths, x the teacher, log-gap closed vs
   the same architecture's CE-only baseline, tokens, wall time, tokens/s, peak GPU memory; then per set (VALID
   and each held-out set) perplexity, x the teacher and, for hybrid rows with a window, the recovery:
   (ln ppl_cut - ln ppl_student) / (ln ppl_cut - ln ppl_teacher), the share of the window cut's
   log-perplexity loss that the student wins back (the cut with the row's window; 0 = no better than the
   cut, 1 = the teacher).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's tcache (token counts), as the other benchmarks

# name -> (recipe, extra distill flags, baseline for the log-gap)
RUNS = {
    "v1": ("v1", [], "v1-ce-only"),
    "v1-ce-only": ("v1", ["--alpha", "0", "--beta", "0"], None),
    "v1-ce+kd": ("v1", ["--beta", "0"], "v1-ce-only"),
    "v1-ce+align": ("v1", ["--alpha", "0"], "v1-ce-only"),
    "v1-online": ("v1", ["--online-teacher", "{teacher}"], "v1-ce-only"),
    "v2": ("v2", [], "v2-ce-only"),
    "v2-ce-only": ("v2", ["--alpha", "0", "--beta", "0"], None),
    # the papers' "xLSTM baseline": v1's blocks with a random embedding and head, CE only
    "scratch": ("v1", ["--from-scratch", "--alpha", "0", "--beta", "0"], None),
    # knob: KD-heavy (no CE, fixed T = 1), not part of the default set
    "v1-kd-heavy": ("v1", ["--alpha", "0.9", "--beta", "0.1", "--temperature", "1"], "v1-ce-only"),
    # the hybrid recipe (Hauzenberger et al. 2026) and its ablations; the recipe's own lr, stage I = --stage1-tokens
    "hybrid": ("hybrid", ["--window", "32"], None),
    "hybrid-w16": ("hybrid", ["--window", "16"], None),
    "hybrid-w64": ("hybrid", ["--window", "64"], None),
    "hybrid-no-stage1": ("hybrid", ["--window", "32", "--stage", "2"], None),
    "hybrid-stage1-only": ("hybrid", ["--window", "32", "--stage", "1"], None),
    # xLSTM's input-gate init (bias ~0): the mLSTM normaliser's floor holds almost everywhere (docs/hybrid.md)
    "hybrid-igate0": ("hybrid", ["--window", "32", "--igate-bias", "0"], None),
    "hybrid-mlstm-only": ("hybrid", ["--branches", "mlstm"], None),
    "window-only": ("hybrid", ["--window", "32", "--branches", "window", "--stage", "2"], None),
    "hybrid-ce-only": ("hybrid", ["--window", "32", "--alpha", "0"], None),
    "hybrid-mlstm-rope": ("hybrid", ["--window", "32", "--mlstm-rope"], None),
    # knob: stage II trains only the mixers, at 10x the recipe's lr
    "hybrid-mixer-lr1e-4": ("hybrid", ["--window", "32", "--train", "mixer", "--lr", "1e-4"], None),
    # knobs: stage II end to end on the new parameters only (the teacher's stay exactly as copied), or all at 1e-4
    "hybrid-new-lr1e-3": ("hybrid", ["--window", "32", "--train", "new", "--lr", "1e-3"], None),
    "hybrid-lr1e-4": ("hybrid", ["--window", "32", "--lr", "1e-4"], None),
    # issue 24: the mixer variants (feature-map capacity = mLSTM state size; stage I on the attention weights; LoRA
    # stage II) and the quality / state frontier (windows 16..256, window-only against the hybrid, full layers)
    "hybrid-f64": ("hybrid", ["--window", "32", "--feature-dim", "64"], None),
    "hybrid-f32": ("hybrid", ["--window", "32", "--feature-dim", "32"], None),
    "hybrid-joint": ("hybrid", ["--window", "32", "--mix", "joint"], None),
    "hybrid-kv": ("hybrid", ["--window", "32", "--mlstm-heads", "kv"], None),
    "hybrid-kv-f64": ("hybrid", ["--window", "32", "--mlstm-heads", "kv", "--feature-dim", "64"], None),
    "hybrid-weights": ("hybrid", ["--window", "32", "--match-loss", "weights"], None),
    "hybrid-match-both": ("hybrid", ["--window", "32", "--match-loss", "both"], None),
    "hybrid-lora": ("hybrid", ["--window", "32", "--train", "lora"], None),
    "hybrid-w128": ("hybrid", ["--window", "128"], None),
    "hybrid-w256": ("hybrid", ["--window", "256"], None),
    "hybrid-full1": ("hybrid", ["--window", "32", "--full-attention-layers", "0"], None),
    "hybrid-full2": ("hybrid", ["--window", "32", "--full-attention-layers", "0,4"], None),
    **{f"window-only-w{w}": ("hybrid", ["--window", str(w), "--branches", "window", "--stage", "2"], None)
       for w in (16, 64, 128, 256)},
}
PRESETS = {
    # the mixer variants at W = 32 (one GPU call), and the quality / state frontier (another)
    "issue24-mixers": ["hybrid", "window-only", "hybrid-joint", "hybrid-f64", "hybrid-f32", "hybrid-kv",
                       "hybrid-kv-f64", "hybrid-weights", "hybrid-match-both", "hybrid-lora"],
    "issue24-frontier": ["hybrid-w16", "hybrid-w64", "hybrid-w128", "hybrid-w256", "hybrid-full1", "hybrid-full2",
                         "window-only-w16", "window-only-w64", "window-only-w128", "window-only-w256"],
}
PRESETS["issue24"] = PRESETS["issue24-mixers"] + PRESETS["issue24-frontier"]
"""--runs NAME: a named list of rows (each also gets its window cut and the teacher)."""
DEFAULT_RUNS = ["v1", "v1-ce-only", "v2", "v2-ce-only", "scratch", "hybrid", "hybrid-w16", "hybrid-w64",
                "hybrid-no-stage1", "hybrid-stage1-only", "hybrid-igate0", "hybrid-mlstm-only", "window-only",
                "hybrid-ce-only", "hybrid-mlstm-rope",
                "hybrid-mixer-lr1e-4"]
HEAD_WINDOWS = 128  # also scored on VALID's first 128 windows of 512: the issue's calibration used 128 windows
LONG = 2048  # every model is also scored on windows of this length (the shared teacher was trained at 512)
SHARED = Path(os.environ.get("TCACHE_SHARED", ROOT.parent / "shared"))  # the shared teacher and corpus (tests' too)
HELDOUT = sorted(str(p) for p in (ROOT / "benchmarks" / "data").glob("heldout-*.jsonl.xz"))
CUT_SINKS = 4  # tcache distill's --sinks default: no row passes --sinks, so every hybrid row has 4
DEFAULT_WINDOW = 32  # tcache distill's --window default, for hybrid rows that do not pass --window
# --smoke: defaults for a CPU run of the whole pipeline in minutes (explicit flags still win)
SMOKE = {"teacher": str(SHARED / "teacher"), "train": str(SHARED / "corpus" / "train.jsonl.xz"),
         "work": "/tmp/tcache-quality-smoke/work",
         "out": "/tmp/tcache-quality-smoke/out", "build_tokens": "16k", "tokens_per_run": "2k",
         "stage1_tokens": "1k", "hybrid_batch": "2", "eval_tokens": "4k", "heldout_tokens": "4k",
         "runs": "hybrid", "deadline": 900.0}
REQUIRED = ("teacher", "train", "valid", "work", "out")
# --smoke without --valid: the head of the shared valid.jsonl (two books' first 40k characters, ~20k tokens), as
# every eval tokenises its whole file's first 4M characters: all of valid.jsonl for a few windows otherwise
SMOKE_VALID = (SHARED / "corpus" / "valid.jsonl", 2, 40_000)


def tcache(*args: str) -> list[str]:
    return [sys.executable, "-m", "tcache", *args]


# ---- pure arithmetic and naming (tests/test_quality_tables.py) ----

def gap_closed(ppl: float, start: float, target: float) -> float | None:
    """Share of the log-perplexity gap from `start` to `target` that `ppl` closes: (ln start - ln ppl) /
    (ln start - ln target); None when start == target (no gap to close)."""
    gap = math.log(start) - math.log(target)
    return None if gap == 0 else (math.log(start) - math.log(ppl)) / gap


def recovery(ppl_student: float, ppl_cut: float, ppl_teacher: float) -> float | None:
    """Share of the window cut's log-perplexity loss that the student wins back: 0 = the untrained cut, 1 =
    the teacher, < 0 worse than the cut."""
    return gap_closed(ppl_student, ppl_cut, ppl_teacher)


def ratio_to_teacher(ppl: float, ppl_teacher: float) -> float:
    return ppl / ppl_teacher


def set_columns(ppl: dict[str, float], teacher: dict[str, float], cut: dict[str, float] | None) -> dict:
    """Per set of `ppl` (set -> perplexity): perplexity, x the teacher and, given the row's window cut, the
    recovery; a set the teacher (or the cut) lacks gets no ratio (no recovery)."""
    out = {}
    for name, p in ppl.items():
        col = {"perplexity": p}
        if name in teacher:
            col["vs_teacher"] = ratio_to_teacher(p, teacher[name])
            if cut is not None and name in cut:
                col["recovery"] = recovery(p, cut[name], teacher[name])
        out[name] = col
    return out


def set_name(path: str) -> str:
    """benchmarks/data/heldout-pydocs.jsonl.xz -> pydocs."""
    name = Path(path).name
    for ext in (".xz", ".jsonl"):
        name = name.removesuffix(ext)
    return name.removeprefix("heldout-")


def row_window(name: str) -> int | None:
    """The sliding window of a hybrid row, None for rows without one (xLSTM recipes, the mLSTM-only ablation)."""
    recipe, flags, _ = RUNS[name]
    if recipe != "hybrid" or flag_value(flags, "--branches", "both") == "mlstm":
        return None
    return int(flag_value(flags, "--window", DEFAULT_WINDOW))


def flag_value(flags: list[str], flag: str, default):
    """The value after `flag` in a row's distill flags, or `default` when the row does not pass it."""
    return flags[flags.index(flag) + 1] if flag in flags else default


def cut_name(window: int) -> str:
    return f"cut-w{window}"


def cut_windows(names: list[str]) -> list[int]:
    """The windows of the untrained cuts to score: one per window the hybrid rows in `names` use."""
    return sorted({w for n in names if n in RUNS and (w := row_window(n)) is not None})


def describe(name: str) -> tuple[str, list[str], str | None]:
    """(recipe, flags, baseline) of a row: a trained run of RUNS or an untrained window cut."""
    if name in RUNS:
        return RUNS[name]
    return "window-cut", ["--window", name.removeprefix("cut-w"), "--sinks", str(CUT_SINKS)], None


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
    ap.add_argument("--grad-accum", default="4")
    ap.add_argument("--deadline", type=float, default=560, help="seconds; unfinished runs are killed")
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


def heldout_sets(a) -> dict[str, str]:
    """set name -> path of the held-out sets to score."""
    return {set_name(p): p for p in a.heldout.split(",") if p}


def head_tokens(a) -> int:
    """VALID's first HEAD_WINDOWS windows of 512, or all of --eval-tokens when that is less (a smoke run)."""
    from tcache.units import parse_count

    return min(HEAD_WINDOWS * 512, parse_count(a.eval_tokens, "--eval-tokens"))


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
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if a.valid_head:
        write_head(a.valid_head[0], Path(a.valid), *a.valid_head[1:])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}

    # 1. build
    cache = work / "cache"
    t = time.time()
    subprocess.run(tcache("build", "--teacher", a.teacher, "--data", a.train, "--tokens", a.build_tokens,
                          "--out", str(cache), "--batch-size", "64", "--overwrite"), check=True, env=env,
                   stdout=open(out / "build.log", "w"), stderr=subprocess.STDOUT)
    manifest = json.loads((cache / "manifest.json").read_text())
    build = {"wall_s": round(time.time() - t, 1), "tokens": manifest["tokens"], **manifest["build"]}
    print(f"build: {build['tokens']:,} tokens in {build['wall_s']} s ({build['tokens_per_s']:,.0f} tok/s in the loop)",
          flush=True)

    # 2. + 3. students, the window cuts and the teacher eval, concurrently (one thread per job, each running
    # subprocesses)
    deadline = t0 + a.deadline
    sets = heldout_sets(a)
    head = str(head_tokens(a))

    def run(cmd: list[str], log: Path, stdout=None) -> int:
        try:
            with open(log, "a") as lf:
                return subprocess.run(cmd, env=env, stdout=stdout or lf, stderr=lf,
                                      timeout=max(deadline - time.time(), 1)).returncode
        except subprocess.TimeoutExpired:
            print(f"{log.stem}: killed at the deadline", flush=True)
            return -9

    def student(name: str) -> None:
        recipe, extra, _ = RUNS[name]
        run_dir = work / name
        t = time.time()
        if recipe == "hybrid":  # the recipe's own learning rates, one stage I budget
            knobs = ["--stage1-tokens", a.stage1_tokens, "--batch-size", a.hybrid_batch, "--grad-accum", "1"]
        else:
            knobs = ["--lr", a.lr, "--grad-accum", a.grad_accum]
        rc = run(tcache("distill", str(cache), "--out", str(run_dir), "--recipe", recipe, "--tokens",
                        a.tokens_per_run, *knobs, "--seed", "0", "--workers", "1", "--overwrite",
                        *[x.format(teacher=a.teacher) for x in extra]), out / f"{name}.log")
        if rc == 0:
            # beside the run, not in it: a run directory holds only what tcache writes (--overwrite checks)
            (work / f"{name}.wall.json").write_text(json.dumps({"distill_wall_s": round(time.time() - t, 1)}))
            evaluate(str(run_dir), name)

    def window_cut(name: str) -> None:
        # a fresh directory each time: the cut is rewritten from --teacher, never reused from an earlier run
        cut_dir = work / name
        if cut_dir.exists():
            import shutil

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
                       out / f"{name}.log", stdout=f) == 0:
                    os.replace(work / f"{name}.eval{suffix}.json.partial", work / f"{name}.eval{suffix}.json")

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


def write_results(out: Path, result: dict) -> None:
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    text = tables(result)
    (out / "quality.md").write_text(text + "\n")
    print(text)


def load_json_output(path: Path) -> dict:
    """A command's --json output; tolerates log lines before the object (older evals printed kernel builds)."""
    text = path.read_text()
    return json.loads(text[text.index('{\n  "'):])


def load_if(path: Path) -> dict:
    return load_json_output(path) if path.exists() else {}


def set_evals(work: Path, name: str, sets: list[str]) -> dict[str, dict]:
    """set -> `tcache eval` result of `name` on VALID at 512 ("valid") and on each held-out set it finished."""
    files = {"valid": work / f"{name}.eval.json", **{s: work / f"{name}.eval.heldout-{s}.json" for s in sets}}
    return {s: load_json_output(f) for s, f in files.items() if f.exists()}


def collect(work: Path, names: list[str], a, build: dict, wall: float) -> dict:
    sets = list(heldout_sets(a))
    teacher = load_json_output(work / "teacher.eval.json")
    teacher_long = load_if(work / "teacher.eval.long.json")
    teacher_head = load_if(work / "teacher.eval.head.json")
    teacher_sets = set_evals(work, "teacher", sets)
    teacher_ppl = {s: e["perplexity"] for s, e in teacher_sets.items()}
    rows = {}
    for name in names:
        recipe, flags, _ = describe(name)
        d = work / name
        r = {"name": name, "recipe": recipe, "flags": flags, "finished": (work / f"{name}.eval.json").exists()}
        if recipe == "window-cut":
            r.update(window=int(flags[1]), sinks=CUT_SINKS, untrained=True)
        elif (d / "student.json").exists():
            s = json.loads((d / "student.json").read_text())
            r.update(tokens=s["trained"]["tokens"], steps=s["trained"]["steps"], train_s=s["trained"]["seconds"],
                     tokens_per_s=s["trained"]["tokens"] / max(s["trained"]["seconds"], 1e-9),
                     peak_gpu_gib=s.get("peak_gpu_memory_gib"), params=s["params"], kernels=s["kernels"],
                     final=s["final_metrics"])
        if (work / f"{name}.wall.json").exists():
            r.update(json.loads((work / f"{name}.wall.json").read_text()))
        if r["finished"]:
            e = load_json_output(work / f"{name}.eval.json")
            r.update(perplexity=e["perplexity"], eval_tokens=e["tokens_scored"],
                     vs_teacher=ratio_to_teacher(e["perplexity"], teacher["perplexity"]))
            if (work / f"{name}.eval.head.json").exists() and teacher_head:
                r["head_vs_teacher"] = ratio_to_teacher(
                    load_json_output(work / f"{name}.eval.head.json")["perplexity"], teacher_head["perplexity"])
            if (work / f"{name}.eval.long.json").exists():
                e = load_json_output(work / f"{name}.eval.long.json")
                r.update(perplexity_long=e["perplexity"], long_vs_own_512=e["perplexity"] / r["perplexity"])
        elif (d / "metrics.jsonl").exists():
            lines = (d / "metrics.jsonl").read_text().splitlines()
            r["last_metrics"] = json.loads(lines[-1]) if lines else None
        r["sets"] = {s: {"perplexity": e["perplexity"], "tokens_scored": e["tokens_scored"]}
                     for s, e in set_evals(work, name, sets).items()}
        rows[name] = r
    for name, r in rows.items():
        base = rows.get(describe(name)[2] or "")
        if base and "perplexity" in r and "perplexity" in base:
            r["log_gap_closed"] = gap_closed(r["perplexity"], base["perplexity"], teacher["perplexity"])
            r["baseline"] = base["name"]
        # per set: x the teacher, and the recovery against the untrained cut with the row's window
        window = row_window(name) if name in RUNS else None
        cut = rows.get(cut_name(window)) if window is not None else None
        cut_ppl = {s: c["perplexity"] for s, c in cut["sets"].items()} if cut else None
        ppl = {s: c["perplexity"] for s, c in r["sets"].items()}
        for s, col in set_columns(ppl, teacher_ppl, cut_ppl).items():
            r["sets"][s].update(col)
        if cut is not None:
            r["cut"] = cut["name"]
    if "perplexity" in rows.get("v1", {}) and "perplexity" in rows.get("v1-online", {}):
        rows["v1-online"]["ppl_vs_cache"] = rows["v1-online"]["perplexity"] / rows["v1"]["perplexity"] - 1

    import torch

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "command": " ".join(sys.argv), "tokens_per_run": a.tokens_per_run, "lr": a.lr, "grad_accum": a.grad_accum,
        "build": build,
        "teacher": {"perplexity": teacher["perplexity"], "eval_tokens": teacher["tokens_scored"],
                    "params": teacher["params"], "perplexity_long": teacher_long.get("perplexity"),
                    "perplexity_head": teacher_head.get("perplexity"),
                    "sets": {s: {"perplexity": e["perplexity"], "tokens_scored": e["tokens_scored"]}
                             for s, e in teacher_sets.items()}},
        "long_seq_len": LONG, "stage1_tokens": a.stage1_tokens, "head_windows": head_tokens(a) // 512,
        "sets": {"valid": a.valid, **heldout_sets(a)}, "heldout_tokens": a.heldout_tokens,
        "recovery": "(ln ppl_cut - ln ppl) / (ln ppl_cut - ln ppl_teacher), cut = the untrained window cut "
                    "with the row's window (cut-wW)",
        "runs": rows, "total_wall_s": round(wall, 1),
    }


def fmt(x: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "" if x is None else f"{scale * x:{spec}}{unit}"


def main_table(result: dict) -> list[str]:
    teacher = result["teacher"]
    long = result.get("long_seq_len", LONG)
    head = result.get("head_windows", HEAD_WINDOWS)
    lines = [f"| model | ppl @512 | x teacher | x teacher, first {head} windows | ppl @{long} | "
             f"@{long} / own @512 | log-gap closed (vs) | tokens | train s | tok/s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    tl = teacher.get("perplexity_long")
    lines.append(f"| teacher | {teacher['perplexity']:.2f} | 1.000 | 1.000 | {tl or float('nan'):.2f} | "
                 f"{(tl or float('nan')) / teacher['perplexity']:.3f} | | | | | |")
    for r in result["runs"].values():
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "unfinished"
        gap = f"{100 * r['log_gap_closed']:.1f}% ({r['baseline']})" if r.get("log_gap_closed") is not None else ""
        lines.append(f"| {r['name']} | {ppl} | {r.get('vs_teacher', float('nan')):.3f} | "
                     f"{r.get('head_vs_teacher', float('nan')):.3f} | "
                     f"{r.get('perplexity_long', float('nan')):.2f} | {r.get('long_vs_own_512', float('nan')):.3f} | "
                     f"{gap} | {r.get('tokens', 0):,} | {r.get('train_s', 0):.0f} | {r.get('tokens_per_s', 0):,.0f} | "
                     f"{r.get('peak_gpu_gib') or 0:.2f} |")
    return lines


def sets_table(result: dict) -> list[str]:
    """Per set (VALID, then each held-out set): perplexity, x the teacher, recovery vs the row's window cut."""
    sets = list(result.get("sets", {"valid": None}))
    lines = [f"| model | cut | {' | '.join(f'{s} ppl | x teacher | recovery' for s in sets)} |",
             "|---|---|" + "---|---|---|" * len(sets)]
    teacher = result["teacher"].get("sets", {})
    lines.append("| teacher | | " + " | ".join(f"{fmt(teacher.get(s, {}).get('perplexity'), '.2f')} | 1.000 | "
                                                for s in sets) + " |")
    for r in result["runs"].values():
        cols = []
        for s in sets:
            c = r.get("sets", {}).get(s, {})
            rec = "(cut)" if r["recipe"] == "window-cut" and c else fmt(c.get("recovery"), ".1f", 100, "%")
            cols.append(f"{fmt(c.get('perplexity'), '.2f')} | {fmt(c.get('vs_teacher'), '.3f')} | {rec}")
        lines.append(f"| {r['name']} | {r.get('cut', '')} | {' | '.join(cols)} |")
    return lines


def tables(result: dict) -> str:
    return "\n".join(["", *main_table(result), "", *sets_table(result)])


def print_table(result: dict) -> None:
    print(tables(result))


if __name__ == "__main__":
    main()
