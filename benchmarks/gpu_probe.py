"""GPU probe: kernel correctness on the device and the throughput of each piece, to plan the quality run.

    python benchmarks/gpu_probe.py --teacher T --train TRAIN.jsonl.xz --out DIR

Checks the mlstm_kernels Triton adapter against xlstm's parallel form (forward and gradients, fp32),
then times the student step (bf16 autocast, batch 8 x 512) for v1 (sLSTM vanilla / cuda) and v2
(mLSTM parallel / triton), and a short cache build.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcache.student import losses  # noqa: E402
from tcache.student.model import Student, StudentConfig  # noqa: E402


def check_triton(results: dict) -> None:
    cfg = StudentConfig(vocab_size=512, hidden_size=384, num_blocks=2, num_heads=8, context_length=512)
    torch.manual_seed(0)
    a = Student(cfg, "parallel").cuda()
    b = Student(cfg, "chunkwise--triton_xl_chunk").cuda()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 512, (4, 512), device="cuda")
    la, lb = a(ids)[0], b(ids)[0]
    la.float().square().mean().backward()
    lb.float().square().mean().backward()
    ga = torch.cat([p.grad.ravel() for p in a.parameters() if p.grad is not None])
    gb = torch.cat([p.grad.ravel() for p in b.parameters() if p.grad is not None])
    results["triton_vs_parallel"] = {
        "logits_rel": float((la - lb).norm() / la.norm()),
        "grad_rel": float((ga - gb).norm() / ga.norm()),
    }


def time_step(cfg: StudentConfig, mk: str, sb: str, steps: int = 6, B: int = 8, T: int = 512) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    m = Student(cfg, mk, sb).cuda().train()
    build_s = time.perf_counter() - t0
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    lp = torch.log_softmax(torch.randn(B, T, 64, device="cuda"), -1).sort(-1, descending=True).values
    top = torch.randint(0, cfg.vocab_size, (B, T, 64), device="cuda")
    th = torch.randn(B, T, 1, cfg.hidden_size, device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, h = m(ids, groups=1)
        loss = 0.2 * losses.ce_loss(logits, ids) + 0.7 * losses.kd_loss(logits, lp, top, 2.0) + 0.1 * losses.align_loss(h, th)
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = sorted(times[2:])[len(times[2:]) // 2]
    return {"mlstm": mk, "slstm": sb, "first_step_s": times[0], "median_step_s": med, "tokens_per_s": B * T / med,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "build_s": build_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    check_triton(res)
    print("triton adapter:", res["triton_vs_parallel"], flush=True)
    v1 = StudentConfig(vocab_size=16384, hidden_size=384, num_blocks=4, num_heads=8, slstm_at=[0, 2], context_length=512)
    v2 = StudentConfig(vocab_size=16384, hidden_size=384, num_blocks=8, num_heads=8, context_length=512)
    res["steps"] = []
    for name, cfg, mk, sb in (("v2", v2, "parallel", "vanilla"), ("v2", v2, "chunkwise--triton_xl_chunk", "vanilla"),
                              ("v1", v1, "chunkwise--triton_xl_chunk", "vanilla"),
                              ("v1", v1, "chunkwise--triton_xl_chunk", "cuda")):
        try:
            r = {"recipe": name, **time_step(cfg, mk, sb)}
        except Exception as e:  # record and go on: the probe is for planning
            r = {"recipe": name, "mlstm": mk, "slstm": sb, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        res["steps"].append(r)
        print(json.dumps(r), flush=True)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "tcache", "build", "--teacher", a.teacher, "--data", a.train,
                        "--tokens", "2M", "--out", str(out / "cache"), "--batch-size", "64", "--overwrite"],
                       capture_output=True, text=True)
    res["build_2M"] = {"rc": p.returncode, "wall_s": time.perf_counter() - t, "tail": (p.stdout + p.stderr)[-600:]}
    print(json.dumps(res["build_2M"]), flush=True)
    (out / "probe.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
