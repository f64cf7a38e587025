"""Build and distill scaling over GPUs, in one run: the same `tcache build` and `tcache distill` commands on 1 GPU
and under `torchrun --nproc_per_node N`, at the seeds' scale (SmolLM2-360M shape, random weights), and tokens/s
per GPU of each side by side. Weak scaling for distill: --batch-size is per rank, so N ranks train N x the rows
per step in the same number of steps.

    python benchmarks/multigpu.py --train .gpu/corpus/train.jsonl.xz --tokenizer .gpu/teacher --gpus 2 --out DIR

Writes DIR/multigpu.json and DIR/multigpu.md; each command's output is in DIR/*.log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(cmd: list[str], log: Path, gpus: int) -> float:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
                if gpus > 1 else [sys.executable])
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(launcher + ["-m", "tcache", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} on {gpus} GPU(s) failed (exit {p.returncode}); see {log}")
    return time.perf_counter() - t0


def main() -> None:
    from shapes import make_teacher

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--shape", default="smollm2-360m")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--tokens", default="4M", help="build budget")
    ap.add_argument("--steps", type=int, default=40, help="distill steps")
    ap.add_argument("--batch-size", type=int, default=8, help="distill rows per rank per micro-batch")
    ap.add_argument("--recipe", default="v2")
    ap.add_argument("--work", default="/tmp/multigpu")
    ap.add_argument("--out", default="multigpu-out")
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(a.shape, work / f"teacher-{a.shape}", a.tokenizer)
    rows = []
    caches = {}
    for g in (1, a.gpus):
        cache = work / f"cache-{g}gpu"
        wall = run(["build", "--teacher", str(teacher), "--data", a.train, "--tokens", a.tokens, "--out", str(cache),
                    "--overwrite"], out / f"build-{g}gpu.log", g)
        m = json.loads((cache / "manifest.json").read_text())
        seconds = m["build"]["seconds"]  # the slowest rank's loop under torchrun
        rows.append({"phase": "build", "gpus": g, "tokens": m["tokens"], "seconds": seconds, "wall_s": round(wall, 1),
                     "tokens_per_s": m["tokens"] / seconds, "tokens_per_s_per_gpu": m["tokens"] / seconds / g,
                     "shard_ranks": m["build"].get("shard_ranks")})
        caches[g] = cache
        print(json.dumps(rows[-1]), flush=True)
    for g in (1, a.gpus):
        run_dir = work / f"{a.recipe}-{g}gpu"
        wall = run(["distill", str(caches[1]), "--recipe", a.recipe, "--out", str(run_dir), "--steps", str(a.steps),
                    "--batch-size", str(a.batch_size), "--grad-accum", "1", "--overwrite"],
                   out / f"distill-{g}gpu.log", g)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        late = metrics[len(metrics) // 2:]  # past compilation and warm-up
        dt = late[-1]["elapsed_s"] - late[0]["elapsed_s"]
        tokens = late[-1]["tokens"] - late[0]["tokens"]
        rows.append({"phase": f"distill {a.recipe}", "gpus": g, "tokens": metrics[-1]["tokens"], "seconds": dt,
                     "wall_s": round(wall, 1), "tokens_per_s": tokens / dt, "tokens_per_s_per_gpu": tokens / dt / g,
                     "final_loss": metrics[-1]["loss"]})
        print(json.dumps(rows[-1]), flush=True)
    import torch

    meta = {"device": torch.cuda.get_device_name(0), "gpus": a.gpus, "torch": torch.__version__,
            "command": "python " + " ".join(sys.argv)}
    (out / "multigpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Multi-GPU scaling: {a.shape}, {meta['device']} x {a.gpus}", "", f"`{meta['command']}`", "",
             "| phase | GPUs | tokens/s | tokens/s per GPU | per GPU vs 1 GPU |", "|---|---|---|---|---|"]
    base = {r["phase"]: r["tokens_per_s_per_gpu"] for r in rows if r["gpus"] == 1}
    for r in rows:
        lines.append(f"| {r['phase']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                     f"{r['tokens_per_s_per_gpu'] / base[r['phase']]:.2f}x |")
    (out / "multigpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
