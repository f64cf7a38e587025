"""Quality benchmark: teacher vs hybrid and Distil-xLSTM students vs baselines and ablations. One GPU call.

    python benchmarks/quality.py --teacher T --train TRAIN.jsonl.xz --valid VALID.jsonl --work DIR --out RESULTS

1. `tcache build` over the whole training slice (seq_len 512, defaults otherwise).
2. Students trained concurrently on the one GPU (each is launch-bound and leaves it mostly idle), all
   with the same seed and data, each followed by `tcache eval` on all of VALID at 512 and at 2048 tokens:
   Distil-xLSTM v1 and v2 (--tokens-per-run, --lr) and their CE-only baselines, a from-scratch xLSTM (CE
   only, random embedding and head), and the hybrid recipe (stage I --stage1-tokens, stage II
   --tokens-per-run, the recipe's learning rates) with its ablations: windows 16 / 32 / 64, no stage I,
   mLSTM only, window only (no mLSTM), stage II CE-only.
3. `tcache eval` of the teacher on the same windows.
4. quality.json + a markdown table: perplexity at both lengths, x the teacher, log-gap closed vs the same
   architecture's CE-only baseline, tokens, wall time, tokens/s, peak GPU memory.
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
}
DEFAULT_RUNS = ["v1", "v1-ce-only", "v2", "v2-ce-only", "scratch", "hybrid", "hybrid-w16", "hybrid-w64",
                "hybrid-no-stage1", "hybrid-stage1-only", "hybrid-igate0", "hybrid-mlstm-only", "window-only",
                "hybrid-ce-only", "hybrid-mlstm-rope",
                "hybrid-mixer-lr1e-4"]
HEAD_WINDOWS = 128  # also scored on VALID's first 128 windows of 512: the calibration used 128 windows
LONG = 2048  # every model is also scored on windows of this length (the shared teacher was trained at 512)


def tcache(*args: str) -> list[str]:
    return [sys.executable, "-m", "tcache", *args]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--build-tokens", default="100M", help="budget; the slice holds ~14M, all of it is cached")
    ap.add_argument("--tokens-per-run", default="5M", help="the hybrid's stage II budget too")
    ap.add_argument("--stage1-tokens", default="2.5M", help="the hybrid's stage I budget")
    ap.add_argument("--hybrid-batch", default="16", help="rows per step of the hybrid runs (no accumulation)")
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--eval-tokens", default="2M", help="more than VALID holds: all of it is scored")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS))
    ap.add_argument("--grad-accum", default="4")
    ap.add_argument("--deadline", type=float, default=560, help="seconds; unfinished runs are killed")
    ap.add_argument("--collect-only", action="store_true", help="only rebuild the results from --work")
    a = ap.parse_args()
    if a.collect_only:
        names = [n for n in a.runs.split(",") if n]
        m = json.loads((Path(a.work) / "cache" / "manifest.json").read_text())
        result = collect(Path(a.work), names, a, {"tokens": m["tokens"], **m["build"]}, 0.0)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "quality.json").write_text(json.dumps(result, indent=2))
        print_table(result)
        return
    t0 = time.time()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
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

    # 2. + 3. students and the teacher eval, concurrently (one thread per run, each running subprocesses)
    names = [n for n in a.runs.split(",") if n]
    deadline = t0 + a.deadline

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

    def evaluate(model: str, name: str) -> None:
        for suffix, seq_len, tokens in (("", "512", a.eval_tokens), (".long", str(LONG), a.eval_tokens),
                                        (".head", "512", str(HEAD_WINDOWS * 512))):
            with open(work / f"{name}.eval{suffix}.json.partial", "w") as f:
                if run(tcache("eval", model, "--data", a.valid, "--tokens", tokens, "--seq-len", seq_len,
                              "--batch-size", "8" if seq_len == "512" else "2", "--json"),
                       out / f"{name}.log", stdout=f) == 0:
                    os.replace(work / f"{name}.eval{suffix}.json.partial", work / f"{name}.eval{suffix}.json")

    def teacher_job() -> None:
        evaluate(a.teacher, "teacher")

    with ThreadPoolExecutor(len(names) + 1) as pool:
        futures = [pool.submit(student, n) for n in names] + [pool.submit(teacher_job)]
        for f in futures:
            f.result()

    # 4. results
    result = collect(work, names, a, build, time.time() - t0)
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    print_table(result)


def load_json_output(path: Path) -> dict:
    """A command's --json output; tolerates log lines before the object (older evals printed kernel builds)."""
    text = path.read_text()
    return json.loads(text[text.index('{\n  "'):])


def collect(work: Path, names: list[str], a, build: dict, wall: float) -> dict:
    teacher = load_json_output(work / "teacher.eval.json")
    teacher_long = load_json_output(work / "teacher.eval.long.json") if (work / "teacher.eval.long.json").exists() else {}
    teacher_head = load_json_output(work / "teacher.eval.head.json") if (work / "teacher.eval.head.json").exists() else {}
    rows = {}
    for name in names:
        d = work / name
        r = {"name": name, "recipe": RUNS[name][0], "flags": RUNS[name][1],
             "finished": (work / f"{name}.eval.json").exists()}
        if (d / "student.json").exists():
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
                     vs_teacher=e["perplexity"] / teacher["perplexity"])
            if (work / f"{name}.eval.head.json").exists() and teacher_head:
                r["head_vs_teacher"] = (load_json_output(work / f"{name}.eval.head.json")["perplexity"]
                                        / teacher_head["perplexity"])
            if (work / f"{name}.eval.long.json").exists():
                e = load_json_output(work / f"{name}.eval.long.json")
                r.update(perplexity_long=e["perplexity"], long_vs_own_512=e["perplexity"] / r["perplexity"])
        elif (d / "metrics.jsonl").exists():
            lines = (d / "metrics.jsonl").read_text().splitlines()
            r["last_metrics"] = json.loads(lines[-1]) if lines else None
        rows[name] = r
    for name, r in rows.items():
        base = rows.get(RUNS[name][2] or "")
        if base and "perplexity" in r and "perplexity" in base:
            gap = math.log(base["perplexity"]) - math.log(teacher["perplexity"])
            r["log_gap_closed"] = (math.log(base["perplexity"]) - math.log(r["perplexity"])) / gap
            r["baseline"] = base["name"]
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
                    "perplexity_head": teacher_head.get("perplexity")},
        "long_seq_len": LONG, "stage1_tokens": a.stage1_tokens,
        "runs": rows, "total_wall_s": round(wall, 1),
    }


def print_table(result: dict) -> None:
    teacher = result["teacher"]
    long = result.get("long_seq_len", LONG)
    print(f"\n| model | ppl @512 | x teacher | x teacher, first {HEAD_WINDOWS} windows | ppl @{long} | "
          f"@{long} / own @512 | log-gap closed (vs) | tokens | train s | tok/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    tl = teacher.get("perplexity_long")
    print(f"| teacher | {teacher['perplexity']:.2f} | 1.000 | 1.000 | {tl or float('nan'):.2f} | "
          f"{(tl or float('nan')) / teacher['perplexity']:.3f} | | | | | |")
    for r in result["runs"].values():
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "unfinished"
        gap = f"{100 * r['log_gap_closed']:.1f}% ({r['baseline']})" if "log_gap_closed" in r else ""
        print(f"| {r['name']} | {ppl} | {r.get('vs_teacher', float('nan')):.3f} | "
              f"{r.get('head_vs_teacher', float('nan')):.3f} | "
              f"{r.get('perplexity_long', float('nan')):.2f} | {r.get('long_vs_own_512', float('nan')):.3f} | {gap} | "
              f"{r.get('tokens', 0):,} | {r.get('train_s', 0):.0f} | {r.get('tokens_per_s', 0):,.0f} | "
              f"{r.get('peak_gpu_gib') or 0:.2f} |")

if __name__ == "__main__":
    main()
