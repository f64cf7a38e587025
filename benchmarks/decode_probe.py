"""Decode probe (issue 22): tokens/s of generate() after a B x T prompt, per model, timed as generate(64 new tokens)
minus generate(1) after a warm-up of each, with the captures the static decoder made. Exploration on the way to
benchmarks/speed.py; its two H200 calls are kept in benchmarks/results/speed-h200-static/probe-call*.txt.

    B=8 T=8192 python benchmarks/decode_probe.py teacher-static hybrid hybrid-eager v2 v2-eager   # call 1
    B=8 T=8192 python benchmarks/decode_probe.py hybrid:layer v2:layer hybrid:full               # call 2 (+ B=1, B=64)

NAME[:MODE]: teacher-static (transformers' static cache + compile), teacher-eager, a student (v2, hybrid) with its
static decoder (tcache.student.inference.decode.StaticDecoder: the step captured in a CUDA graph, compiled per
MODE = TCACHE_STATIC_COMPILE: layer, the default; full; off), NAME-eager the same static step with TCACHE_CUDA_GRAPH=0
and TCACHE_STATIC_COMPILE=off (neither captured nor compiled; a MODE is ignored). Call 1 ran before the layer compile
existed, and its -eager rows ran the concatenating step the library has since dropped."""
import os, sys, time, torch
from speed import EAGER_ENV
from speed_models import SHAPES, build
dev, dt = torch.device("cuda"), torch.bfloat16
N = 64
B, T = int(os.environ.get('B', 8)), int(os.environ.get('T', 8192))
for name in sys.argv[1:]:
    name, _, cmode = name.partition(":")
    os.environ.update(EAGER_ENV if name.endswith("-eager") else {"TCACHE_CUDA_GRAPH": "auto",
                                                                 "TCACHE_STATIC_COMPILE": cmode or "layer"})
    base = name.removesuffix("-eager").removesuffix("-static")
    m = build(base if base != "teacher" else "teacher", SHAPES["smollm2-360m"], dev, dt)
    ids = torch.randint(1, 49152, (B, T), device=dev)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if name == "teacher-static":
        kw["cache_implementation"] = "static"
    def gen(n):
        torch.cuda.synchronize(); t = time.perf_counter()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize(); return time.perf_counter() - t
    try:
        tc = time.perf_counter(); gen(N); tc = time.perf_counter() - tc; gen(1)
        t1, tn = gen(1), gen(N)
        print(f"{name+':'+cmode:16s} first {tc:.1f}s B{B} T{T}: decode {B*(N-1)/(tn-t1):9.0f} tok/s  step {1e3*(tn-t1)/(N-1):.2f} ms  prefill {t1:.3f} s", flush=True)
    except Exception as e:
        print(f"{name}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)
    if hasattr(m, "static_decode_captures"):
        print("   captures", m.static_decode_captures, flush=True)
    if os.environ.get("PROFILE") and not name.startswith("teacher"):
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen(8)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    del m; torch.cuda.empty_cache()
