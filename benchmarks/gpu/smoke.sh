set -x
source benchmarks/gpu/site.sh
nvidia-smi --query-gpu=name --format=csv,noheader
W=/tmp/smoke; mkdir -p $W
python3 -m tcache build --teacher .gpu/teacher --data .gpu/corpus/train.jsonl.xz --tokens 3M --out $W/cache --batch-size 64 2>&1 | tail -2
ls -la $W/cache/teacher
time python3 -m tcache distill $W/cache --out $W/h --recipe hybrid --tokens 1M --stage1-tokens 0.5M --batch-size 16 --grad-accum 1 --workers 1 2>&1 | tr '\r' '\n' | grep -v "^$" | tail -6
python3 - <<'PY'
import json
m = [json.loads(l) for l in open("/tmp/smoke/h/metrics.jsonl")]
for r in m[::10] + [m[-1]]:
    print(r["step"], r["stage"], {k: round(r[k], 4) for k in ("match", "ce", "kd", "tokens_per_s") if k in r})
print(json.load(open("/tmp/smoke/h/student.json")).get("peak_gpu_memory_gib"))
PY
for L in 512 2048; do python3 -m tcache eval $W/h --data .gpu/corpus/valid.jsonl --tokens 300k --seq-len $L --batch-size 4 2>&1 | tail -4; done
python3 -m tcache eval .gpu/teacher --data .gpu/corpus/valid.jsonl --tokens 300k --seq-len 512 2>&1 | tail -3
cp $W/h/metrics.jsonl $OUT/ 2>/dev/null
