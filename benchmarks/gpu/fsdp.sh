# Issue 37's measurement in one call on a machine of N GPUs (nvidia-h100-x2 / -x4): `tcache build` and `distill` on 1
# GPU and under torchrun on all N (benchmarks/multigpu.py), distill sharded with FSDP2 (--shard fsdp, --compile auto:
# each layer compiled), for the hybrid and v2 at the SmolLM2-360M shape; tokens/s per GPU against the unsharded GPU
# and rank 0's peak memory. Extra arguments go to multigpu.py (e.g. --distill-args "--max-gpu-memory 8GiB").
source benchmarks/gpu/site.sh
nvidia-smi --query-gpu=name --format=csv,noheader
N=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
mkdir -p $OUT/fsdp
for recipe in hybrid v2; do
  rm -rf /tmp/mg-$recipe
  timeout ${RECIPE_S:-270} python3 benchmarks/multigpu.py --train .gpu/corpus/train.jsonl.xz --tokenizer .gpu/teacher \
    --gpus $N --recipe $recipe --shard fsdp --tokens 1M --steps 30 --work /tmp/mg-$recipe --out $OUT/fsdp/$recipe "$@" \
    2>&1 | tail -12
done
