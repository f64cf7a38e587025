# One GPU call that reruns the committed speed tables (README's "Speed vs the teacher served at its best", from
# benchmarks/results/speed-h200-static/run3) with speed.py's end-to-end decode timing (issue 36): every row's decode
# cell as (t(generate 1 + N new tokens) - t(generate 1)) / N, the teacher through generate(cache_implementation=
# "static") with transformers' own compile, kernels per step from a profiled pair per row.
#   bash benchmarks/gpu/speed.sh                  (from the repo root, .gpu/ carried: its wheels)
# Defaults: the README tables' rows (teacher-static, teacher-eager, v2, hybrid, v1) at batches 1 and 8, contexts
# 2k / 8k / 32k and 128k for the students, within BUDGET=500 s of rows (speed.py drops a row's largest cells at its
# share; speed.json names them "not run") and WALL_S=560 s in all, so the call fits one 600 s command.
# BATCHES=64 LENGTHS=2k,8k STUDENT_LENGTHS= reruns the batch-64 line in a second call. MODELS, STEPS, REPS, SHAPE
# (tiny: a CPU dry run of this script) override; TCACHE_FUSED_STEP (and the other decode variables speed.json records
# per row) pass through to the rows' processes.
source benchmarks/gpu/site.sh
mkdir -p $OUT/speed
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/speed/gpu.txt
python3 -c "import torch, triton, transformers as tf; print('torch', torch.__version__, 'triton', triton.__version__,
  'transformers', tf.__version__)" | tee -a $OUT/speed/gpu.txt
CMD=(python3 benchmarks/speed.py --shape ${SHAPE:-smollm2-360m}
     --models ${MODELS:-teacher-static,teacher-eager,v2,hybrid,v1}
     --batches ${BATCHES:-1,8} --long-batches ${BATCHES:-1,8} --lengths ${LENGTHS:-2k,8k,32k}
     --student-lengths "${STUDENT_LENGTHS-128k}" --steps ${STEPS:-32} --reps ${REPS:-3} --budget ${BUDGET:-500}
     --out $OUT/speed)
echo "${CMD[*]}" | tee $OUT/speed/command.txt
# the profiler's start / stop lines (one pair per profiled call) stay in the log, out of the tail
timeout ${WALL_S:-560} "${CMD[@]}" > $OUT/speed/log 2>&1
echo "rc $?"
grep -v "^USDT" $OUT/speed/log | grep -E "^\[|^==" | tail -60
cat $OUT/speed/speed.md 2>/dev/null
true
