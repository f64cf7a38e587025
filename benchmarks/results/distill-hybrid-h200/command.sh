python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
(timeout 90 python -m pytest -q -s -p no:logging -p no:cacheprovider tests/test_window.py tests/test_hybrid_compile.py tests/test_hybrid.py -k "cuda or bf16" 2>&1 | grep -E "mixer on|passed|failed|FAILED|Error" | tail -8) | tee $OUT/tests.txt
mkdir -p $OUT/distill; python benchmarks/distill.py --hybrid --tokenizer .gpu/tok --train .gpu/train.jsonl.xz --out $OUT/distill --budget 390 2>&1 | grep -v Warn | tee $OUT/distill/log | grep -E "^\||Error|error" | cut -c1-220
