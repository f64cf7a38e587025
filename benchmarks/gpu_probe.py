"""GPU probe: kernel correctness on the device and the throughput of each piece, to plan the quality run.

    python benchmarks/gpu_probe.py --teacher T --train TRAIN.jsonl.xz --out DIR

Checks the mlstm_kernels Triton adapter against xlstm's parallel form (forward and gradients, fp32),
builds a 2M-token cache of the teacher, then times the library's student step (setup() -> Trainer, bf16
autocast, batch 8 x 512) for v1 (sLSTM vanilla / cuda) and v2 (mLSTM parallel / triton) on its rows.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from distill_steps import B, T, gpu_batches, time_steps
from harness.env import describe, parser, tcache
from harness.results import write_json
from tcache.student.models.xlstm import Student, StudentConfig
from tcache.student.training.config import DistillConfig
from tcache.student.training.train import setup


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


def time_step(cache: Path, out: Path, recipe: str, mk: str, sb: str, steps: int = 6) -> dict:
    """The library's training step (setup() -> Trainer), bf16 autocast, batch 8 x 512, eager, on cache rows."""
    cfg = DistillConfig(cache=str(cache), out=str(out / "run"), recipe=recipe, mlstm_kernel=mk, slstm_backend=sb,
                        precision="bf16", compile="off", batch_size=B, grad_accum=1, steps=steps)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr = setup(cfg)
    build_s = time.perf_counter() - t0
    first_s, _, _ = time_steps(tr, gpu_batches(str(cache), tr.plan.groups, 2), warmup=1, steps=0)
    _, sec, _ = time_steps(tr, gpu_batches(str(cache), tr.plan.groups, 2), warmup=1, steps=steps)
    return {"mlstm": tr.plan.info["mlstm_kernel"], "slstm": tr.plan.info["slstm_backend"], "first_step_s": first_s,
            "mean_step_s": sec / steps, "tokens_per_s": steps * B * T / sec,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "build_s": build_s}


def main() -> None:
    ap = parser(__doc__, ("teacher", "train", "out"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = describe("cuda")
    check_triton(res)
    print("triton adapter:", res["triton_vs_parallel"], flush=True)
    t = time.perf_counter()
    p = subprocess.run(tcache("build", "--teacher", a.teacher, "--data", a.train, "--tokens", "2M", "--out",
                              out / "cache", "--batch-size", "64", "--overwrite"), capture_output=True, text=True)
    res["build_2M"] = {"rc": p.returncode, "wall_s": time.perf_counter() - t, "tail": (p.stdout + p.stderr)[-600:]}
    print(json.dumps(res["build_2M"]), flush=True)
    res["steps"] = []
    for name, mk, sb in (("v2", "parallel", "vanilla"), ("v2", "chunkwise--triton_xl_chunk", "vanilla"),
                         ("v1", "chunkwise--triton_xl_chunk", "vanilla"), ("v1", "chunkwise--triton_xl_chunk", "cuda")):
        try:
            r = {"recipe": name, **time_step(out / "cache", out, name, mk, sb)}
        except Exception as e:  # record and go on: the probe is for planning
            r = {"recipe": name, "mlstm": mk, "slstm": sb, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        res["steps"].append(r)
        print(json.dumps(r), flush=True)
    write_json(out / "probe.json", res)


if __name__ == "__main__":
    main()
