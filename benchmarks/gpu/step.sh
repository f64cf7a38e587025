# One GPU call for the training step (issue 32): the CUDA tests of the kernels and steps, then distill.py --hybrid's
# parts given as arguments. Default: the parts issue 32 asks for side by side, with profiles: the anchor (CUDA graphs)
# at 8 x 512 and 8 x 2048, the hybrid's stage II (also at 2048), stage I and T4 path with the defaults, the v2 step.
# PARTS=extra (the first argument) runs the variants that decide defaults instead, most wanted first after the
# anchor and stage II: the v2 step (layer scope) and compiled whole (TCACHE_COMPILE_SCOPE=step), stage II with
# TCACHE_COMPILE_SCOPE=regions, over full logits (--loss-chunk 0), with the mLSTM kernel in fp32, the T4 path with
# --activation-budget 0, stage II with flex_attention for the window, the default-mode anchor.
#   bash benchmarks/gpu/step.sh [PARTS] [BUDGET_S]     (from the repo root, .gpu/ carried: tok, corpus, wheels)
# PREWARM=N compiles every part N at a time first; PREWARM_ONLY=1 stops there (a first call whose caches a second,
# timed call on the same warm machine reads: every part then fits one call). TESTS=paths picks the CUDA tests.
# torch.compile's artifacts travel between machines (benchmarks/harness/compile_cache.py): .gpu/compile-cache.tgz,
# when carried, is loaded; $OUT/r/compile-cache.tgz holds what this call compiled, to copy to .gpu/ for the next.
# BENCH_S=S stops the benchmark after S seconds so the files still come back (an outer timeout would cut them).
source benchmarks/gpu/site.sh
TOK=.gpu/tok; [ -d $TOK ] || TOK=.gpu/teacher  # the tokenizer: .gpu/tok, or the whole teacher when it travels instead
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
mkdir -p $OUT/r /tmp/cc && export TCACHE_BENCH_COMPILE_CACHE=/tmp/cc
[ -f .gpu/compile-cache.tgz ] && tar xzf .gpu/compile-cache.tgz -C /tmp/cc
if [ -z "$SKIP_TESTS" ]; then  # the tests' ../shared, from what travels: the tokenizer, and text for valid.jsonl
  mkdir -p /tmp/shared/teacher /tmp/shared/corpus && cp $TOK/* /tmp/shared/teacher/
  xzcat .gpu/corpus/train.jsonl.xz | head -5 > /tmp/shared/corpus/valid.jsonl
  # the gradients through nested compile regions on this GPU, with and without inductor's buffer reuse
  timeout 120 python3 benchmarks/region_grads.py 2>&1 | tee $OUT/r/region-grads.txt
  TCACHE_SHARED=/tmp/shared timeout ${TEST_S:-240} python3 -m pytest -v -p no:cacheprovider -rP ${TESTS:-tests/test_mlstm_op.py tests/test_static_decode.py tests/test_joint_decode.py \
    tests/test_window.py tests/test_hybrid.py tests/test_chunked_prefill.py tests/test_hybrid_compile.py} \
    -k "cuda or twin or adapter_pads" 2>&1 | tee $OUT/r/cuda-tests.txt | tail -15
fi
PARTS=${1:-plain_lm_compiled_cudagraphs,hybrid_stage2,hybrid_stage1,hybrid_stage2_fp16_16gib,v2_step,plain_lm_compiled_2048_cudagraphs,hybrid_stage2_2048}
[ "$PARTS" = extra ] && PARTS=plain_lm_compiled_cudagraphs,hybrid_stage2,v2_step,v2_step_whole,hybrid_stage2_regions,hybrid_stage2_full_logits,hybrid_stage2_kernel_fp32,hybrid_stage2_fp16_16gib_budget0,hybrid_stage2_flex_window,plain_lm_compiled
timeout ${BENCH_S:-0} python3 benchmarks/distill.py --hybrid --tokenizer $TOK --train .gpu/corpus/train.jsonl.xz --out /tmp/step-out \
  --budget ${2:-330} --parts $PARTS ${PROFILE---profile} --prewarm ${PREWARM:-0} ${PREWARM_ONLY:+--prewarm-only} 2>&1 | tee $OUT/r/run.log | grep -v "^{" | tail -25
cp /tmp/step-out/*.json $OUT/r/ 2>/dev/null
(cd /tmp/step-out && tar czf $OUT/r/profiles.tgz profile-*.txt) 2>/dev/null
(cd /tmp/cc && tar czf $OUT/r/compile-cache.tgz . && ls -l $OUT/r/compile-cache.tgz) 2>/dev/null
true
