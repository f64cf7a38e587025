"""Build speed vs the teacher's bare forward, side by side in one run, plus bytes per token by field.

    python benchmarks/build.py --teacher T --train TRAIN.jsonl.xz --out RESULTS [--tokens 8M --smol-tokens 2M]

For the shared teacher and for a SmolLM2-360M-shaped teacher with random weights (hidden 960, 32 layers,
15 heads, 5 kv heads, vocab 49152, tied), same batch (64 x 512) and dtype (bf16):
  bare      the teacher's forward alone on pre-tokenised rows (logits included, nothing kept)
  reference teacher_targets (output_hidden_states, stack, top-k) + synchronous copies, no writes
  build     `tcache build` end to end to local disk: tokenisation, teacher, encoding, HDF5 writes
            (loop time from the manifest; `+sync` adds flushing the page cache to disk)
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from harness.env import describe, parser, workdirs
from harness.results import table, write_json
from harness.timing import loop_seconds
from shapes import make_teacher
from tcache.hf import load_teacher
from tcache.teachercache.build import build
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.teacher import teacher_targets
from tcache.text import DataSpec, iter_texts, pack_rows
from tcache.units import parse_count

B, T = 64, 512


def timed(fn, rows: np.ndarray) -> float:
    """tokens/s of fn over all rows in batches of B, after one warm-up batch."""
    batches = [torch.from_numpy(rows[i:i + B]).cuda().long() for i in range(0, len(rows) - B + 1, B)]  # (B, T) each
    _, seconds = loop_seconds(lambda i: fn(batches[i]), 1, len(batches))
    return len(batches) * B * T / seconds


@torch.no_grad()
def forward_rates(model, rows: np.ndarray) -> tuple[float, float]:
    """tokens/s of the bare forward and of the reference targets path, on the same rows."""
    L = len(model.model.layers)
    bare = timed(lambda ids: model(input_ids=ids, use_cache=False).logits, rows)

    def reference(ids):
        tgt = teacher_targets(model, ids, [(0, L)], 64)
        tgt.hidden.half().cpu(), tgt.topk_logprobs.cpu(), tgt.topk_ids.cpu()

    return bare, timed(reference, rows)


def measure(name: str, teacher: str, data: str, tokens: int, work: Path) -> dict:
    model, tok = load_teacher(teacher, torch.device("cuda"), torch.bfloat16)
    n_rows = tokens // T
    rows = np.stack(list(itertools.islice(pack_rows(iter_texts(DataSpec(data)), tok, T, tok.eos_token_id), n_rows)))
    bare, ref = forward_rates(model, rows)
    del model
    torch.cuda.empty_cache()
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    m = build(BuildConfig(teacher=teacher, data=DataSpec(data), out=str(out), tokens=n_rows * T, seq_len=T,
                          top_k=64, batch_size=B, device="cuda", dtype="bf16"))
    wall = time.perf_counter() - t
    ts = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - ts
    loop = m.tokens / m.build["seconds"]
    bytes_per_token = {n: spec.bytes_per_row / T for n, spec in m.field_specs().items()}
    res = {
        "teacher": name, "tokens": m.tokens, "batch": B, "dtype": "bf16",
        "bare_tok_s": bare, "reference_tok_s": ref, "build_loop_tok_s": loop,
        "build_with_sync_tok_s": m.tokens / (m.build["seconds"] + sync_s),
        "build_wall_s": wall, "sync_s": sync_s,
        "ratio_build_vs_bare": loop / bare, "ratio_build_sync_vs_bare": m.tokens / (m.build["seconds"] + sync_s) / bare,
        "ratio_reference_vs_bare": ref / bare,
        "bytes_per_token": bytes_per_token, "bytes_per_token_total": sum(bytes_per_token.values()),
        "hooked_hidden": m.build.get("hooked_hidden"), "tokenizer_workers": m.build.get("tokenizer_workers"),
        "loop_s": m.build["seconds"], "waited_for_rows_s": m.build.get("waited_for_rows_s"),
        "waited_for_writer_s": m.build.get("waited_for_writer_s"), "writer_busy_s": m.build.get("writer_busy_s"),
    }
    print(json.dumps(res), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = parser(__doc__, ("teacher", "train", "out"), work="/tmp/tcache-build-bench")
    ap.add_argument("--tokens", default="8M")
    ap.add_argument("--smol-tokens", default="2M")
    a = ap.parse_args()
    work, out = workdirs(a)
    results = [measure("shared-teacher", a.teacher, a.train, parse_count(a.tokens), work)]
    smol = make_teacher("smollm2-360m", work / "smol-teacher", a.teacher)
    results.append(measure("smollm2-360m-shape", str(smol), a.train, parse_count(a.smol_tokens), work))
    write_json(out / "build.json", {**describe("cuda"), "results": results})
    print("\n" + "\n".join(table(
        ["teacher", "tokens", "bare tok/s", "reference (x bare)", "build loop (x bare)", "build + sync (x bare)",
         "B/token"],
        [[r["teacher"], f"{r['tokens']:,}", f"{r['bare_tok_s']:,.0f}",
          f"{r['reference_tok_s']:,.0f} ({r['ratio_reference_vs_bare']:.2f}x)",
          f"{r['build_loop_tok_s']:,.0f} ({r['ratio_build_vs_bare']:.2f}x)",
          f"{r['build_with_sync_tok_s']:,.0f} ({r['ratio_build_sync_vs_bare']:.2f}x)",
          f"{r['bytes_per_token_total']:.0f}"] for r in results])))


if __name__ == "__main__":
    main()
