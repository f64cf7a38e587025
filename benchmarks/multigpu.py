"""Build and distill scaling over GPUs, in one run: the same `tcache build` and `tcache distill` commands on 1 GPU
and under `torchrun --nproc_per_node N`, at the seeds' scale (SmolLM2-360M shape, random weights), and tokens/s
per GPU of each side by side. Weak scaling for distill: --batch-size is per rank, so N ranks train N x the rows
per step in the same number of steps.

    python benchmarks/multigpu.py --train .gpu/corpus/train.jsonl.xz --tokenizer .gpu/teacher --gpus 2 --out DIR \
        [--recipe hybrid --shard fsdp]

--shard fsdp: the N-GPU distill shards the student with FSDP2 (issue 37; the 1-GPU row stays unsharded, the
baseline a user has), each row with its peak GPU memory (rank 0's, from student.json); --distill-args passes more
options to both distill commands (e.g. "--max-gpu-memory 8GiB", for a student that would not fit unsharded).

Writes DIR/multigpu.json and DIR/multigpu.md; each command's output is in DIR/*.log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness.env import ROOT, child_env, describe, workdirs
from harness.results import table, write_json
from harness.rows import run_row


def run(cmd: list[str], log: Path, gpus: int) -> float:
    """Wall seconds of `tcache CMD` on `gpus` GPUs (under torchrun for more than one), its output in `log`."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
                if gpus > 1 else [sys.executable])
    with open(log, "w") as f:
        env = child_env(CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))))
        r = run_row(launcher + ["-m", "tcache", *cmd], None, env, f, subprocess.STDOUT, cwd=ROOT)
    if r.rc:
        raise SystemExit(f"{' '.join(cmd)} on {gpus} GPU(s) failed (exit {r.rc}); see {log}")
    return r.wall_s


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
    ap.add_argument("--shard", default="none", choices=("none", "fsdp", "auto"), help="the N-GPU distill's --shard")
    ap.add_argument("--distill-args", default="", help="more distill options for both rows, space-separated")
    ap.add_argument("--work", default="/tmp/multigpu")
    ap.add_argument("--out", default="multigpu-out")
    a = ap.parse_args()
    work, out = workdirs(a)
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
        shard = a.shard if g > 1 else "none"
        wall = run(["distill", str(caches[1]), "--recipe", a.recipe, "--out", str(run_dir), "--steps", str(a.steps),
                    "--batch-size", str(a.batch_size), "--grad-accum", "1", "--overwrite", "--shard", shard,
                    *a.distill_args.split()], out / f"distill-{g}gpu.log", g)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        late = metrics[len(metrics) // 2:]  # past compilation and warm-up
        dt = late[-1]["elapsed_s"] - late[0]["elapsed_s"]
        tokens = late[-1]["tokens"] - late[0]["tokens"]
        student = json.loads((run_dir / "student.json").read_text())
        rows.append({"phase": f"distill {a.recipe}", "gpus": g, "shard": shard, "tokens": metrics[-1]["tokens"],
                     "seconds": dt, "wall_s": round(wall, 1), "tokens_per_s": tokens / dt,
                     "tokens_per_s_per_gpu": tokens / dt / g, "final_loss": metrics[-1]["loss"],
                     "peak_gib_rank0": student.get("peak_gpu_memory_gib")})
        print(json.dumps(rows[-1]), flush=True)
    meta = {**describe(), "gpus": a.gpus}
    write_json(out / "multigpu.json", {"meta": meta, "rows": rows})
    base = {r["phase"]: r["tokens_per_s_per_gpu"] for r in rows if r["gpus"] == 1}
    lines = [f"# Multi-GPU scaling: {a.shape}, {meta['device']} x {a.gpus}", "", f"`{meta['command']}`", "",
             *table(["phase", "GPUs", "shard", "tokens/s", "tokens/s per GPU", "per GPU vs 1 GPU", "peak GiB (rank 0)"],
                    [[r["phase"], r["gpus"], r.get("shard", ""), f"{r['tokens_per_s']:,.0f}",
                      f"{r['tokens_per_s_per_gpu']:,.0f}", f"{r['tokens_per_s_per_gpu'] / base[r['phase']]:.2f}x",
                      r.get("peak_gib_rank0", "")] for r in rows])]
    (out / "multigpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
