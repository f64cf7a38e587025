python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
mkdir -p $OUT/distill
python benchmarks/distill.py --hybrid --tokenizer .gpu/tok --train .gpu/train.jsonl.xz --out $OUT/distill --budget 170 \
  --parts hybrid_stage2_fp16_16gib,plain_lm_eager 2>&1 | grep -v Warn > $OUT/distill/log
grep -E "^\|" $OUT/distill/log | cut -c1-160
timeout 45 python -m pytest -q -x -p no:cacheprovider tests/test_static_decode.py -k twin 2>&1 | grep -vi warn | tail -30 > $OUT/twin.txt; tail -30 $OUT/twin.txt
