python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv | tee $OUT/gpu.txt
(timeout 120 python -m pytest -q -p no:logging -p no:cacheprovider tests/test_static_decode.py tests/test_window.py tests/test_chunked_prefill.py 2>&1 | tail -15) | tee $OUT/tests.txt
timeout 60 python .gpu/diag.py v1 2>&1 | grep -v DEBUG | tail -40 | tee $OUT/v1.txt
CUDA_LAUNCH_BLOCKING=1 timeout 90 python .gpu/diag.py v2long 2>&1 | tail -25 | tee $OUT/v2long.txt
timeout 150 python .gpu/diag.py profile v2 hybrid hybrid:full 2>&1 | tee $OUT/profile.txt | grep -E "B8|kernels per|Failed|Error" 
timeout 100 python .gpu/diag.py teacher 2>&1 | tee $OUT/teacher.txt | grep -E "teacher-static|Error"
