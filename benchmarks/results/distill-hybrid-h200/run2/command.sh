# Issue 23's call: CUDA tests, the hybrid step's parts with profiles; in the background the sLSTM CUDA probe (issue 22)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
python -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)" | tee -a $OUT/device.txt
(timeout 570 python benchmarks/slstm_probe.py /tmp/bench_done > $OUT/slstm_probe.txt 2>&1; echo "rc=$?" >> $OUT/slstm_probe.txt) &
(timeout 100 python -m pytest -q -p no:cacheprovider tests/test_window.py tests/test_hybrid_compile.py tests/test_hybrid.py -k "cuda or bf16" 2>&1 | tail -15) > $OUT/tests.txt
tail -3 $OUT/tests.txt
mkdir -p $OUT/distill
python benchmarks/distill.py --hybrid --profile --tokenizer .gpu/tok --train .gpu/train.jsonl.xz --out $OUT/distill --budget 380 \
  --parts plain_lm_compiled,hybrid_stage2,hybrid_stage2_compile_off,v2_step,hybrid_stage2_mlstm_fp32,hybrid_stage1,hybrid_stage2_dense_window \
  2>&1 | grep -v Warn > $OUT/distill/log
grep -E "^\|" $OUT/distill/log | cut -c1-160
touch /tmp/bench_done; wait
head -c 1500 $OUT/slstm_probe.txt | grep -v "^{" | head -20
for f in $OUT/distill/profile-*.txt; do echo "$f"; head -1 $f; done
