"""Exploration only (not committed): one GPU call's diagnostics for issue 22. Sections by argv[1]."""
import os, sys, time, traceback, statistics
import torch
sys.path.insert(0, os.getcwd())
sec = sys.argv[1]
dev, dt = torch.device("cuda"), torch.bfloat16

def tiny(recipe, backend="vanilla"):
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from test_static_decode import student
    return student(recipe)

if sec == "v1":
    from tcache.student import decode, static_decode
    from tcache.student.static_decode import StaticDecoder
    for cmode in ("off", "layer"):
        for dtype in (torch.float32, torch.bfloat16):
            os.environ["TCACHE_STATIC_COMPILE"] = cmode
            try:
                m = tiny("v1").cuda().to(dtype)
                p = torch.randint(0, 97, (2, 9), device=dev)
                with torch.no_grad():
                    _, st = decode.prefill(m, p)
                    _, st2 = decode.prefill(m, p)
                e = StaticDecoder(m, st, capture=False); g = StaticDecoder(m, st2, capture=True)
                n = torch.randint(0, 97, (2, 1), device=dev)
                a, b = e.step(n), g.step(n); a2, b2 = e.step(n), g.step(n)
                print(f"v1 {cmode} {dtype}: OK maxdiff {(a2.float()-b2.float()).abs().max().item():.3g}", flush=True)
            except Exception:
                print(f"v1 {cmode} {dtype}: FAILED"); traceback.print_exc(limit=-12)

if sec == "v2long":  # run with CUDA_LAUNCH_BLOCKING=1
    from benchmarks.speed import SHAPES, build
    from tcache.student import decode
    m = build("v2", SHAPES["smollm2-360m"], dev, dt)
    for B, T in ((8, 32768), (1, 131072), (8, 131072)):
        try:
            ids = torch.randint(0, 49152, (B, T), device=dev)
            torch.cuda.synchronize(); t = time.perf_counter()
            with torch.no_grad():
                lg, st = decode.prefill(m.student, ids, keep=1)
            torch.cuda.synchronize()
            print(f"v2 prefill {B}x{T}: OK {B*T/(time.perf_counter()-t):,.0f} tok/s, peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB", flush=True)
        except Exception:
            print(f"v2 prefill {B}x{T}: FAILED", flush=True); traceback.print_exc(limit=-15); break
        del ids; torch.cuda.empty_cache()

if sec == "profile":  # replay time vs generate's per-token time, kernels per step
    from benchmarks.speed import SHAPES, build
    from tcache.student import decode
    from tcache.student.static_decode import StaticDecoder
    from torch.profiler import profile, ProfilerActivity
    B = int(os.environ.get("B", 8))
    for name in sys.argv[2:]:
        fam, _, cmode = name.partition(":")
        os.environ["TCACHE_STATIC_COMPILE"] = cmode or "layer"
        hf = build(fam, SHAPES["smollm2-360m"], dev, dt); m = hf.student
        ids = torch.randint(0, 49152, (B, 2048), device=dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            _, st = decode.prefill(m, ids, keep=1)
        g = StaticDecoder(m, st, capture=True)
        n = torch.randint(0, 49152, (B, 1), device=dev)
        g.step(n); torch.cuda.synchronize(); tcap = time.perf_counter() - t0
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        times = []
        for _ in range(30):
            ev[0].record(); g.graph.replay(); ev[1].record(); torch.cuda.synchronize(); times.append(ev[0].elapsed_time(ev[1]))
        # back-to-back replays, host not waiting
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(50): g.graph.replay()
        torch.cuda.synchronize(); b2b = (time.perf_counter() - t) / 50 * 1e3
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        def gen(k):
            torch.cuda.synchronize(); t = time.perf_counter(); hf.generate(ids[:, :256], max_new_tokens=k, min_new_tokens=k, **kw); torch.cuda.synchronize(); return time.perf_counter() - t
        gen(2); gen(2); a, b = gen(2), gen(34)
        print(f"{name} B{B}: capture+prefill {tcap:.1f}s; replay median {statistics.median(times):.3f} ms, back-to-back {b2b:.3f} ms; generate per token {(b-a)/32*1e3:.3f} ms", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): g.graph.replay()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        tot = sum(k.count for k in ka if k.device_type.name == "CUDA") / 5
        print(f"   kernels per step (profiler, in graph): {tot:.0f}", flush=True)
        print(ka.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70), flush=True)
        del hf, m, g, st; torch.cuda.empty_cache()

if sec == "teacher":  # compile cost per static-cache shape, and the static teacher's per-token time + profile
    from benchmarks.speed import SHAPES, build
    m = build("teacher", SHAPES["smollm2-360m"], dev, dt)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")
    for B, L in ((1, 2048), (1, 8192), (8, 2048)):
        ids = torch.randint(0, 49152, (B, 64), device=dev)
        m.__dict__.pop("_previous_max_cache_length", None)
        torch.cuda.synchronize(); t = time.perf_counter()
        m.generate(ids, max_new_tokens=9, min_new_tokens=9, max_cache_len=L + 40, **kw); torch.cuda.synchronize()
        first = time.perf_counter() - t
        def gen(k):
            torch.cuda.synchronize(); t = time.perf_counter(); m.generate(ids, max_new_tokens=k, min_new_tokens=k, max_cache_len=L + 40, **kw); torch.cuda.synchronize(); return time.perf_counter() - t
        a, b = gen(2), gen(34)
        print(f"teacher-static B{B} cache {L}: first generate {first:.1f}s, per token {(b-a)/32*1e3:.3f} ms", flush=True)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        gen(8)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70), flush=True)
