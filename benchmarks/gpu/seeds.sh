source benchmarks/gpu/site.sh
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/seeds
timeout 330 python3 benchmarks/distill.py --tokenizer .gpu/teacher --train .gpu/corpus/train.jsonl.xz --out $OUT/seeds \
  --work /tmp/bench --shape smollm2-360m --steps 12 --hybrid > $OUT/seeds/run.log 2>&1
rc=$?
tail -12 $OUT/seeds/run.log
exit $rc
