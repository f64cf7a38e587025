#!/usr/bin/env bash
# End to end on CPU, the teacher absent during distillation: build -> delete teacher copy -> distill -> eval.
# Usage: bash benchmarks/cpu_e2e.sh [WORKDIR] [STEPS]   (defaults: /tmp/tcache-e2e, 300)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
shared=${TCACHE_SHARED:-$here/../shared}
work=${1:-/tmp/tcache-e2e}
steps=${2:-300}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$work" && mkdir -p "$work"
cp -r "$shared/teacher" "$work/teacher"
tcache build --teacher "$work/teacher" --data "$shared/corpus/train.jsonl.xz" --tokens 320k --seq-len 256 \
  --top-k 64 --out "$work/cache"
rm -rf "$work/teacher"   # from here on, no teacher on disk
tcache stats "$work/cache" --json > "$work/stats.json"
tcache distill "$work/cache" --recipe v1 --out "$work/student" --steps "$steps" --batch-size 4 --grad-accum 1 \
  --lr 1e-3 --ckpt-every 100
tcache eval "$work/student" --data "$shared/corpus/valid.jsonl" --tokens 100k --seq-len 256 --json > "$work/eval_student.json"
tcache eval "$shared/teacher" --data "$shared/corpus/valid.jsonl" --tokens 100k --seq-len 256 --json > "$work/eval_teacher.json"
python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
m = [json.loads(l) for l in open(f"{w}/student/metrics.jsonl")]
head, tail = m[:10], m[-10:]
avg = lambda rows, k: sum(r[k] for r in rows) / len(rows)
print("| term | mean of first 10 steps | mean of last 10 steps |")
print("|---|---|---|")
for k in ("ce", "kd", "align"):
    print(f"| {k} | {avg(head, k):.3f} | {avg(tail, k):.3f} |")
s, t = json.load(open(f"{w}/eval_student.json")), json.load(open(f"{w}/eval_teacher.json"))
print(f"\nperplexity on {s['tokens_scored']:,} held-out tokens ({s['windows']} windows x {s['seq_len']}):"
      f" student {s['perplexity']:.2f}, teacher {t['perplexity']:.2f} (same windows: {s['tokens_scored'] == t['tokens_scored']})")
PY
