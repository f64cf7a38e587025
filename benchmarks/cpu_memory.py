"""Where a CPU distill step's memory goes: peak RSS of one micro-batch (forward + backward) of the library's
Trainer, for the defaults and one change at a time, each in a fresh process (a peak RSS only rises).

    python benchmarks/cpu_memory.py CACHE [--recipe v1] [--out results/cpu-memory.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from harness.env import ROOT
from harness.results import emit, row, table
from harness.rows import run_result

VARIANTS = {  # name -> DistillConfig overrides
    "defaults": {},
    "--loss-chunk 0 --checkpointing off (the defaults before)": {"loss_chunk": 0, "checkpointing": "off"},
    "--checkpointing off": {"checkpointing": "off"},
    "--loss-chunk 0": {"loss_chunk": 0},
    "--slstm-at none (all mLSTM)": {"slstm_at": "none"},
    "--mlstm-kernel chunkwise--native_autograd": {"mlstm_kernel": "chunkwise--native_autograd"},
    "--batch-size 4 --grad-accum 8": {"batch_size": 4, "grad_accum": 8},
}


def one(cache: str, recipe: str, overrides: dict) -> dict:
    import tempfile

    import torch

    from tcache.student.training.config import DistillConfig
    from tcache.student.training.train import setup
    from tcache.student.training.data import CacheRows

    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # noqa: E731  GiB (Linux: KiB)
    base = rss()
    cfg = DistillConfig(cache=cache, out=tempfile.mkdtemp(), recipe=recipe, steps=1, **overrides)
    tr = setup(cfg)
    after_setup = rss()
    rows = CacheRows(cache, with_hidden=tr.plan.groups > 0)
    items = [rows[i] for i in range(cfg.batch_size)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    t = time.time()
    tr.micro_step(batch, tr.weights(0, 0))
    sec, peak = time.time() - t, rss()
    if overrides.get("checkpointing") == "off":  # after the peak was read: this forward adds its own
        tr.opt.zero_grad(set_to_none=True)
        saved = saved_by_block(tr, batch)
    return {"rss_start_gib": round(base, 2), "rss_after_setup_gib": round(after_setup, 2),
            "peak_gib": round(peak, 2), "micro_step_s": round(sec, 1),
            "kernels": {"mlstm": tr.plan.info.get("mlstm_kernel"), "slstm": tr.plan.info.get("slstm_backend")},
            "batch": [cfg.batch_size, tr.plan.seq_len], "loss_chunk": tr.chunk,
            **({"saved_gib": saved} if overrides.get("checkpointing") == "off" else {})}


def saved_by_block(tr, batch) -> dict[str, float]:
    """GiB that autograd keeps for the backward, by the block that saved it (each storage counted once):
    the forward of the loss terms under a saved-tensors hook."""
    import torch

    where, seen, acc = ["embedding"], set(), {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            acc[where[0]] = acc.get(where[0], 0) + t.untyped_storage().nbytes() / 2**30
        return t

    hooks = []
    for i, blk in enumerate(tr.model.blocks.blocks):
        kind = type(getattr(blk, "xlstm", blk)).__name__
        hooks.append(blk.register_forward_pre_hook(lambda m, a, n=f"block {i} ({kind})": where.__setitem__(0, n)))
        hooks.append(blk.register_forward_hook(lambda m, a, o: where.__setitem__(0, "head and losses")))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tr.terms(batch, tr.weights(0, 0))
    for h in hooks:
        h.remove()
    return {k: round(v, 3) for k, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("--recipe", default="v1")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-memory.md"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        emit(one(a.cache, a.recipe, json.loads(a.one)))
        return
    lines = ["# CPU distill memory: one micro-batch of the library's Trainer", "",
             f"Command: `python benchmarks/cpu_memory.py CACHE --recipe {a.recipe}` (CACHE: the shared teacher over "
             "100k tokens of corpus/valid.jsonl, seq_len 512); each row a fresh process, peak RSS (ru_maxrss).", "",
             *table(["variant", "peak RSS GiB", "after setup GiB", "micro-step s", "kernels"])]
    saved: dict = {}
    for name, ov in VARIANTS.items():
        r = run_result([sys.executable, __file__, a.cache, "--recipe", a.recipe, "--one", json.dumps(ov)])
        print(name, r, flush=True)
        lines.append(row([name, r.get("peak_gib"), r.get("rss_after_setup_gib"), r.get("micro_step_s"),
                          r.get("kernels", r.get("error"))]))
        if "saved_gib" in r:
            saved = r["saved_gib"]
    lines += ["", "Kept for the backward (GiB, autograd's saved tensors by the block that saved them), "
              "`--checkpointing off`:", "",
              *table(["part", "GiB"], [*saved.items(), ["total", f"{sum(saved.values()):.3f}"]])]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
