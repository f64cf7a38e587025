"""Writes tests/data/export-9f8b194/: one tiny export per recipe (v1, v2, hybrid), made with the code of commit 9f8b194
(the last commit before student/ was split into models / training / inference), and what that code computed from
each: logits of fixed ids and greedy tokens from its recurrent `generate()`. tests/test_old_export.py loads these
exports with today's tcache and holds them to those numbers, so an export made before a move keeps loading.

    git worktree add /tmp/tcache-9f8b194 9f8b194 && cd /tmp/tcache-9f8b194 && pip install -e . --no-deps
    cd /work/main/tests/data && python make_old_export.py      # then pip install -e /work/main --no-deps again

The teacher is cache-v1's tiny random Llama (2 layers, hidden 32, a 21-id character tokenizer), so each export is
a few tens of KB.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEACHER = HERE / "cache-v1" / "teacher"
DATA = HERE / "cache-v1" / "data.jsonl"
OUT = HERE / "export-9f8b194"
IDS = [[3, 7, 5, 2, 9, 4, 11, 6, 8, 3, 12, 5], [4, 4, 10, 2, 6, 13, 7, 3, 9, 14, 2, 5]]  # (2, 12), ids < 21
NEW = 6  # greedy tokens generated after IDS


def main() -> None:
    import tcache
    from tcache.student.config import DistillConfig
    from tcache.student.hf import export_student
    from tcache.student.train import distill
    from tcache.teachercache.build import build
    from tcache.teachercache.config import BuildConfig
    from tcache.text import DataSpec

    print("tcache from", Path(tcache.__file__).parent)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(BuildConfig(teacher=str(TEACHER), data=DataSpec(str(DATA)), out=str(tmp / "cache"), tokens=2 * 16,
                          seq_len=16, top_k=4, batch_size=2, device="cpu"))
        for recipe in ("v1", "v2", "hybrid"):
            # a window of 4 and 2 sinks: the 12-token prompt and its continuation run past both
            extra = {"stage1_tokens": "32", "window": 4, "sinks": 2} if recipe == "hybrid" else {}
            distill(DistillConfig(cache=str(tmp / "cache"), out=str(tmp / recipe), recipe=recipe, steps=2,
                                  batch_size=2, grad_accum=1, lr=3e-3, seed=0, device="cpu", **extra))
            export_student(tmp / recipe, OUT / recipe)
    # what the old code computes from its own exports, in a fresh process through transformers' remote code
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor({IDS})
out = {{}}
for recipe in ("v1", "v2", "hybrid"):
    m = AutoModelForCausalLM.from_pretrained({str(OUT)!r} + "/" + recipe, trust_remote_code=True)
    logits = m(ids).logits  # (2, 12, 21)
    greedy = m.generate(ids, max_new_tokens={NEW}, do_sample=False, min_new_tokens={NEW})[:, ids.shape[1]:]
    out[recipe] = {{"logits": logits.tolist(), "greedy": greedy.tolist()}}
json.dump(out, sys.stdout)
"""
    ref = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/")
    (OUT / "reference.json").write_text(json.dumps({"commit": "9f8b194", "ids": IDS, **json.loads(ref.stdout)}))
    print("wrote", OUT)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
