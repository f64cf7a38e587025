"""Every combination of distill options that exists, run on the GPU as a user runs it. One GPU call.

    python benchmarks/distill_matrix.py --teacher T --train TRAIN.jsonl.xz --valid VALID.jsonl --out RESULTS

1. The README's build command (defaults: seq_len 512, top-k 64, nf4 hidden) over --build-tokens of TRAIN.
2. The README's own commands, verbatim (recipe defaults: grad-accum 4, --compile auto, which is CUDA graphs
   on compute capability >= 8.0): `tcache distill CACHE --recipe v1|v2 --out DIR`, then `tcache eval` of each
   student at 512 and at 2048 tokens per window (4x its training length) and of the teacher.
3. The matrix, each run a fresh `tcache distill` process, several at a time on the one GPU:
   recipe v1/v2 x --compile off/on/cudagraphs x --grad-accum 1/4 (fp16); bf16; online targets;
   checkpoint + --resume (the resumed steps' losses must equal the uninterrupted run's).
4. distill-matrix.json (every run's command, exit code, last error line, steps, final losses, tok/s,
   peak GiB) and a table. Losses of compiled runs are compared with the eager run of the same
   recipe / accumulation / precision: same data and init, so they differ only by kernel rounding.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.env import child_env, describe, parser, tcache
from harness.results import error_line, row as row_of, table, write_json
from harness.rows import Budget, Row, run_row

STEPS = 8
DEADLINE_S = 420
"""Seconds from the script's start by which every build and distill process is stopped."""
EVAL_S = 120
"""Seconds one `tcache eval` may take."""


def logged(name: str, r: Row, cmd: list[str], out: Path) -> dict:
    """A finished command as distill-matrix.json records it (its stderr's tail also goes to out/logs.txt)."""
    rc = -9 if r.timed_out else r.rc
    with open(out / "logs.txt", "a") as f:
        f.write(f"### {name}: {' '.join(map(str, cmd))} -> {rc}\n{r.stderr[-3000:]}\n")
    return {"cmd": " ".join(map(str, cmd)), "rc": rc, "wall_s": round(r.wall_s, 1),
            "error": error_line(r.stderr) if rc else None}


def matrix() -> dict[str, list[str]]:
    runs: dict[str, list[str]] = {}
    for recipe in ("v1", "v2"):
        for compile_ in ("off", "on", "cudagraphs"):
            for accum in (1, 4):
                runs[f"{recipe} {compile_} accum{accum} fp16"] = [
                    "--recipe", recipe, "--compile", compile_, "--grad-accum", str(accum), "--precision", "fp16"]
        for compile_ in ("off", "cudagraphs"):
            for accum in (1, 4):
                runs[f"{recipe} {compile_} accum{accum} bf16"] = [
                    "--recipe", recipe, "--compile", compile_, "--grad-accum", str(accum), "--precision", "bf16"]
        runs[f"{recipe} auto accum4 online"] = ["--recipe", recipe, "--online-teacher", "{teacher}"]
        runs[f"{recipe} auto accum4 ckpt"] = ["--recipe", recipe, "--ckpt-every", str(STEPS // 2)]
    return runs


def main() -> None:
    ap = parser(__doc__, ("teacher", "train", "valid", "out"), work="/tmp/tcache-matrix")
    ap.add_argument("--build-tokens", default="400k")
    ap.add_argument("--eval-tokens", default="256k")
    ap.add_argument("--parallel", type=int, default=6, help="distill processes at a time")
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    env = child_env()
    t0 = time.time()
    budget = Budget(DEADLINE_S)
    results: dict = {"runs": {}, "evals": {}}

    def run(name: str, cmd: list[str]) -> dict:
        r = logged(name, run_row(cmd, max(budget.left(), 5), env, capture=True), cmd, out)
        print(f"{name}: rc {r['rc']} in {r['wall_s']} s {r['error'] or ''}", flush=True)
        return r

    # 1. the README's build
    cache = work / "cache"
    results["build"] = run("build", tcache("build", "--teacher", a.teacher, "--data", a.train,
                                           "--tokens", a.build_tokens, "--out", cache))

    def metrics(d: Path) -> list[dict]:
        f = d / "metrics.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []

    def distill_run(name: str, flags: list[str]) -> None:
        d = work / name.replace(" ", "-")
        flags = [x.format(teacher=a.teacher) for x in flags]
        budget = [] if name.startswith("readme") else ["--steps", str(STEPS), "--batch-size", "8"]
        r = run(name, tcache("distill", cache, "--out", d, *budget, *flags))
        m = metrics(d)
        if (d / "student.json").exists():
            s = json.loads((d / "student.json").read_text())
            r.update(steps=s["trained"]["steps"], tokens_per_s=round(s["trained"]["tokens"] / s["trained"]["seconds"]),
                     peak_gib=s.get("peak_gpu_memory_gib"), kernels=s["kernels"])
        r["losses"] = [round(x["loss"], 5) for x in m]
        r["grad_norms"] = [round(x["grad_norm"], 4) for x in m]
        r["loss_scales"] = [x.get("loss_scale") for x in m]
        if name.endswith("ckpt") and r["rc"] == 0:  # resume from the middle checkpoint in a copy of the run
            c = work / (d.name + "-resumed")
            shutil.copytree(d, c)
            for f in ("student.json", "model.safetensors"):
                (c / f).unlink()
            rr = run(name + " resume", tcache("distill", cache, "--out", c, *budget, *flags, "--resume"))
            r["resume_rc"], r["resume_error"] = rr["rc"], rr["error"]
            r["resumed_losses"] = [round(x["loss"], 5) for x in metrics(c)]
            # GPU kernels (atomics in backward passes) are not bitwise deterministic run to run: equal
            # means within 1e-4 relative at every step
            diffs = [abs(x - y) / abs(y) for x, y in zip(r["resumed_losses"], r["losses"])]
            r["resume_max_rel_diff"] = max(diffs) if diffs else None
            r["resume_equal"] = len(r["resumed_losses"]) == len(r["losses"]) and max(diffs) <= 1e-4
        results["runs"][name] = r

    # 2. + 3. the README's commands and the matrix, several processes at a time
    def build_resume() -> None:
        """A GPU build stopped by SIGTERM after 2 of its shards, resumed: shards equal an uninterrupted build's."""
        common = ["--teacher", a.teacher, "--data", a.train, "--tokens", a.build_tokens, "--shard-rows", "128"]
        full = run("build full", tcache("build", *common, "--out", work / "b-full"))
        b = work / "b-resumed"
        p = subprocess.Popen(tcache("build", *common, "--out", b), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # stopped by hand below: not a budgeted row
        while p.poll() is None:
            try:
                if len(json.loads((b / "build-state.json").read_text())["shards"]) >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        p.send_signal(15)
        err = p.communicate()[1]
        res = run("build resume", tcache("build", *common, "--out", b, "--resume"))
        r = {"stopped_rc": p.returncode, "stop_message": [x for x in err.splitlines() if x.strip()][-2:],
             "resume_rc": res["rc"], "full_rc": full["rc"]}
        if res["rc"] == 0 and full["rc"] == 0:
            ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (work / "b-full", b))
            r.update(shards=len(ma["shards"]), resumed_at_row=mb["build"].get("resumed_at_row"),
                     identical=[x["sha256"] for x in ma["shards"]] == [x["sha256"] for x in mb["shards"]])
        results["build_resume"] = r
        print("build resume:", r, flush=True)

    jobs = {"readme v1": ["--recipe", "v1"], "readme v2": ["--recipe", "v2"], **matrix()}
    if results["build"]["rc"] == 0:
        with ThreadPoolExecutor(a.parallel) as pool:
            resume_job = pool.submit(build_resume)
            list(pool.map(lambda kv: distill_run(*kv), jobs.items()))
            resume_job.result()
        evals = {"teacher 512": (a.teacher, 512), "teacher 2048": (a.teacher, 2048)}
        for name in ("readme v1", "readme v2"):
            d = work / name.replace(" ", "-")
            evals.update({f"{name} 512": (d, 512), f"{name} 2048": (d, 2048), f"{name} 128": (d, 128)})

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(eval_json, [(k, v, a, env, out, results) for k, v in evals.items()]))

    # losses of each compiled run against the eager run of the same recipe / accumulation / precision
    runs = results["runs"]
    for name, r in runs.items():
        parts = name.split()
        if len(parts) == 4 and parts[1] in ("on", "cudagraphs"):
            ref = runs.get(" ".join([parts[0], "off", *parts[2:]]))
            if ref and r.get("losses") and ref.get("losses"):
                r["max_rel_loss_diff_vs_eager"] = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], ref["losses"]))

    results.update(**describe(), total_wall_s=round(time.time() - t0, 1))
    write_json(out / "distill-matrix.json", results)
    lines = table(["run", "rc", "steps", "first / last loss", "vs eager", "tok/s", "peak GiB", "error"])
    for name, r in runs.items():
        ls = r.get("losses") or []
        loss = f"{ls[0]:.4f} / {ls[-1]:.4f}" if ls else ""
        diff = f"{r['max_rel_loss_diff_vs_eager']:.1e}" if "max_rel_loss_diff_vs_eager" in r else ""
        extra = f" resume rc {r['resume_rc']} equal {r['resume_equal']}" if "resume_rc" in r else ""
        lines.append(row_of([name, r["rc"], r.get("steps", ""), loss, diff, r.get("tokens_per_s", ""),
                             r.get("peak_gib", ""), (r["error"] or "")[:80] + extra]))
    lines += ["", *table(["eval", "rc", "perplexity", "windows x seq", "kernels", "error"])]
    lines += [row_of([name, r["rc"], r.get("perplexity", ""), f"{r.get('windows', '')} x {r.get('seq_len', '')}",
                      r.get("kernels", ""), (r["error"] or "")[:80]]) for name, r in results["evals"].items()]
    print("\n" + "\n".join(lines))


def eval_json(job) -> None:
    name, (model, seq), a, env, out, results = job
    cmd = tcache("eval", model, "--data", a.valid, "--tokens", a.eval_tokens, "--seq-len", seq, "--json")
    row = run_row(cmd, EVAL_S, env, capture=True)
    r = logged(f"eval {name}", row, cmd, out)
    if r["rc"] == 0:
        d = json.loads(row.stdout)
        r.update(perplexity=round(d["perplexity"], 3), windows=d["windows"], seq_len=d["seq_len"],
                 kernels=d.get("kernels"))
    print(f"eval {name}: rc {r['rc']} ppl {r.get('perplexity')} {r['error'] or ''}", flush=True)
    results["evals"][name] = r


if __name__ == "__main__":
    main()
