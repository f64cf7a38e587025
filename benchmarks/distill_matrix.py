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

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def tcache(*args: str) -> list[str]:
    return [sys.executable, "-m", "tcache", *map(str, args)]


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
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/tcache-matrix")
    ap.add_argument("--build-tokens", default="400k")
    ap.add_argument("--eval-tokens", default="256k")
    ap.add_argument("--parallel", type=int, default=6, help="distill processes at a time")
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    results: dict = {"runs": {}, "evals": {}}

    def run(name: str, cmd: list[str], timeout: float = 420) -> dict:
        t = time.time()
        log = out / "logs.txt"
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout - (t - t0), 5))
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = -9, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)
        with open(log, "a") as f:
            f.write(f"### {name}: {' '.join(cmd)} -> {rc}\n{err[-3000:]}\n")
        lines = [x for x in err.splitlines() if x.strip()]
        bad = [x for x in lines if x.startswith(("Error", "RuntimeError", "Traceback")) or "Error:" in x]
        r = {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.time() - t, 1),
             "error": (bad[-1] if bad else lines[-1] if lines else "")[:300] if rc else None}
        print(f"{name}: rc {rc} in {r['wall_s']} s {r['error'] or ''}", flush=True)
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
                             stderr=subprocess.PIPE, text=True)
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

    import torch

    results.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   torch=torch.__version__, command=" ".join(sys.argv), total_wall_s=round(time.time() - t0, 1))
    (out / "distill-matrix.json").write_text(json.dumps(results, indent=2))
    print("\n| run | rc | steps | first / last loss | vs eager | tok/s | peak GiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        ls = r.get("losses") or []
        loss = f"{ls[0]:.4f} / {ls[-1]:.4f}" if ls else ""
        diff = f"{r['max_rel_loss_diff_vs_eager']:.1e}" if "max_rel_loss_diff_vs_eager" in r else ""
        extra = f" resume rc {r['resume_rc']} equal {r['resume_equal']}" if "resume_rc" in r else ""
        print(f"| {name} | {r['rc']} | {r.get('steps', '')} | {loss} | {diff} | {r.get('tokens_per_s', '')} | "
              f"{r.get('peak_gib', '')} | {(r['error'] or '')[:80]}{extra} |")
    print("\n| eval | rc | perplexity | windows x seq | kernels |\n|---|---|---|---|---|")
    for name, r in results["evals"].items():
        print(f"| {name} | {r['rc']} | {r.get('perplexity', '')} | {r.get('windows', '')} x {r.get('seq_len', '')} | "
              f"{r.get('kernels', '')} | {(r['error'] or '')[:80]}")


def eval_json(job) -> None:
    name, (model, seq), a, env, out, results = job
    cmd = tcache("eval", model, "--data", a.valid, "--tokens", a.eval_tokens, "--seq-len", seq, "--json")
    t = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        p = subprocess.CompletedProcess(cmd, -9, "", "killed after 120 s")
    r = {"cmd": " ".join(cmd), "rc": p.returncode, "wall_s": round(time.time() - t, 1), "error": None}
    if p.returncode == 0:
        d = json.loads(p.stdout)
        r.update(perplexity=round(d["perplexity"], 3), windows=d["windows"], seq_len=d["seq_len"],
                 kernels=d.get("kernels"))
    else:
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        r["error"] = (lines[-1] if lines else "")[:300]
    with open(out / "logs.txt", "a") as f:
        f.write(f"### eval {name}: {r['cmd']} -> {p.returncode}\n{p.stderr[-2000:]}\n")
    print(f"eval {name}: rc {p.returncode} ppl {r.get('perplexity')} {r['error'] or ''}", flush=True)
    results["evals"][name] = r


if __name__ == "__main__":
    main()
