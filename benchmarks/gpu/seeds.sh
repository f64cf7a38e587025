python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/seeds
timeout 330 python3 benchmarks/distill.py --tokenizer .gpu/teacher --train .gpu/corpus/train.jsonl.xz --out $OUT/seeds \
  --work /tmp/bench --shape smollm2-360m --steps 12 --hybrid > $OUT/seeds/run.log 2>&1
rc=$?
tail -12 $OUT/seeds/run.log
exit $rc
