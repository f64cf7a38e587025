# The CUDA tests alone (a short GPU call): the mLSTM op and the whole-step compile on the Triton kernels, the captured
# decode steps (gate and joint mix), the window kernels, the kernel adapter's padding. Output: $OUT/r/cuda-tests.txt
source benchmarks/gpu/site.sh
TOK=.gpu/tok; [ -d $TOK ] || TOK=.gpu/teacher  # the tokenizer: .gpu/tok, or the whole teacher when it travels instead
mkdir -p $OUT/r /tmp/shared/teacher /tmp/shared/corpus && cp $TOK/* /tmp/shared/teacher/
xzcat .gpu/corpus/train.jsonl.xz | head -5 > /tmp/shared/corpus/valid.jsonl
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/r/cuda-tests.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/r/cuda-tests.txt
TCACHE_SHARED=/tmp/shared timeout ${TEST_S:-200} python3 -m pytest -v -p no:cacheprovider -rA tests/test_mlstm_op.py tests/test_fused_step.py \
  tests/test_joint_decode.py tests/test_static_decode.py tests/test_window.py tests/test_chunked_prefill.py \
  tests/test_hybrid_compile.py \
  -k "cuda or twin or adapter_pads" 2>&1 | tee -a $OUT/r/cuda-tests.txt | tail -40
