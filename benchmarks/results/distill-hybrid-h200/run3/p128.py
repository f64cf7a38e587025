# v2 at batch 1 x 128k through generate(), after a batch-1 generate that captured the step (as speed.py's row ran)
import os, sys, time, traceback, torch
sys.path.insert(0, os.getcwd())
from benchmarks.speed import SHAPES, build
m = build("v2", SHAPES["smollm2-360m"], torch.device("cuda"), torch.bfloat16)
for B, T in [(1, 64), (1, 131072)]:
    ids = torch.randint(1, 49152, (B, T), device="cuda")
    t = time.perf_counter()
    try:
        m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                   attention_mask=torch.ones_like(ids), return_dict_in_generate=True)
        torch.cuda.synchronize()
        print("ok", B, T, f"{time.perf_counter() - t:.1f} s", flush=True)
    except Exception:
        traceback.print_exc()
        break
