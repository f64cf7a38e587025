"""An export made by an older tcache keeps loading and generating: tests/data/export-9f8b194 holds one tiny export per
recipe written by commit 9f8b194 (before student/ was split by job) and the logits and greedy tokens that commit's
code computed from them (tests/data/make_old_export.py). Today's tcache, through transformers' remote code in a fresh
process, must compute the same."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

OLD = Path(__file__).parent / "data" / "export-9f8b194"


def test_an_export_from_before_the_move_loads_and_generates_as_it_did(tmp_path):
    ref = json.loads((OLD / "reference.json").read_text())
    for recipe in ("v1", "v2", "hybrid"):  # a copy: loading must not need to write beside the export
        shutil.copytree(OLD / recipe, tmp_path / recipe)
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        assert "tcache" not in sys.modules
        ids = torch.tensor({ref["ids"]})
        out = {{}}
        for recipe in ("v1", "v2", "hybrid"):
            m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + recipe, trust_remote_code=True)
            greedy = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
            out[recipe] = {{"logits": m(ids).logits.tolist(), "greedy": greedy.tolist(), "class": type(m).__name__}}
        json.dump(out, sys.stdout)
    """)
    env_modules = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, **env_modules})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout)
    for recipe in ("v1", "v2", "hybrid"):
        assert got[recipe]["class"] == "TcacheStudentForCausalLM"
        want, have = torch.tensor(ref[recipe]["logits"]), torch.tensor(got[recipe]["logits"])
        assert want.shape == have.shape == (2, 12, 21), (recipe, have.shape)
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{recipe}: {m}")
        assert got[recipe]["greedy"] == ref[recipe]["greedy"], recipe
