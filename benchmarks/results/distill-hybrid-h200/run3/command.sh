python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
python -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)" | tee -a $OUT/device.txt
(timeout 110 python -m pytest -q -p no:cacheprovider tests/test_static_decode.py tests/test_window.py tests/test_hybrid_compile.py tests/test_hybrid.py -k "cuda or bf16 or twin" 2>&1 | tail -12) > $OUT/tests.txt
tail -3 $OUT/tests.txt
mkdir -p $OUT/distill
python benchmarks/distill.py --hybrid --tokenizer .gpu/tok --train .gpu/train.jsonl.xz --out $OUT/distill --budget 345 \
  --parts plain_lm_compiled,hybrid_stage2,hybrid_stage1,hybrid_stage2_fp16_16gib,plain_lm_eager 2>&1 | grep -v Warn > $OUT/distill/log
grep -E "^\|" $OUT/distill/log | cut -c1-160
(CUDA_LAUNCH_BLOCKING=1 timeout 45 python .gpu/p128.py 2>&1 | grep -vi warn | tail -25) > $OUT/p128.txt; cat $OUT/p128.txt | tail -12
