"""Promises of issue 34, nothing trusted that was not checked: a cache whose manifest.json no longer describes its
shards (rows, seq_len, the shard list, a field's row shape edited) or whose teacher file is gone, met by verify,
stats and distill; a compressed --data that is truncated or not of its suffix's format, met by build and eval; and
plot targets named for a format tcache does not write (refused) or another image format (drawn as that format).
The faults of the CACHE_TRUST rows in tests/test_reliability.py; they use the fixtures by name as it gives them
(case.fixtures: cache, run, shared_cache, tiny_teacher, valid_jsonl)."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
from pathlib import Path

from conftest import text_head
from promises import Case

# manifest edits of the rows' cache (8 rows of 32 tokens in 2 shards of 4, top-k 8), as the issue's user made them
EDITS = {
    "rows": lambda m: m.update(rows=100),
    "seq_len": lambda m: m.update(seq_len=64),
    "shards": lambda m: m.pop("shards"),
    "topk_ids": lambda m: m["fields"]["topk_ids"].update(row_shape=[16, m["top_k"]]),
}


def _damaged_cache(case: Case, edit: str | None = None) -> Path:
    """`cc`: a copy of the rows' cache with its manifest edited (EDITS[edit]) or, for edit None, its
    teacher/embeddings.safetensors deleted."""
    cc = case.tmp / "cc"
    shutil.copytree(case.fixtures["cache"], cc)
    if edit is None:
        (cc / "teacher" / "embeddings.safetensors").unlink()
    else:
        m = json.loads((cc / "manifest.json").read_text())
        EDITS[edit](m)
        (cc / "manifest.json").write_text(json.dumps(m, indent=2))
    return cc


def on_damaged_cache(command: str, edit: str | None = None):
    """`tcache verify|stats|distill` of the damaged cache (distill into a fresh run directory `r`)."""
    def fault(case: Case) -> list[str]:
        cc = str(_damaged_cache(case, edit))
        if command == "distill":
            return ["distill", cc, "--out", str(case.tmp / "r"), "--recipe", "v2", "--steps", "1", "--batch-size",
                    "2", "--grad-accum", "1", "--device", "cpu"]
        return [command, cc]
    return fault


def no_run(case: Case) -> None:
    """Refused on open: nothing trained, no run directory."""
    assert not (case.tmp / "r").exists(), list((case.tmp / "r").iterdir())


# -- compressed --data ---------------------------------------------------------------------------------------


def _compressed(case: Case, name: str, how: str) -> Path:
    """The user's held-out text as `name`: gzip or xz by its suffix cut to half its bytes (`truncated`, as an
    interrupted download leaves it), or plain text under that name (`plain`)."""
    text = text_head(case.fixtures["valid_jsonl"], case.tmp / "plain.jsonl", 2000).read_bytes()
    if how == "truncated":
        packed = (gzip.compress if name.endswith(".gz") else lzma.compress)(text)
        text = packed[:len(packed) // 2]
    return case.user(name, text)


def build_from(name: str, how: str):
    def fault(case: Case) -> list[str]:
        return ["build", "--teacher", str(case.fixtures["tiny_teacher"]), "--data", str(_compressed(case, name, how)),
                "--tokens", "1k", "--seq-len", "32", "--device", "cpu", "--out", str(case.tmp / "c")]
    return fault


def eval_on(name: str, how: str):
    def fault(case: Case) -> list[str]:
        return ["eval", str(case.fixtures["tiny_teacher"]), "--data", str(_compressed(case, name, how)), "--tokens",
                "64", "--seq-len", "32", "--device", "cpu"]
    return fault


# -- plot targets ----------------------------------------------------------------------------------------------


def plot_out(name: str):
    def fault(case: Case) -> list[str]:
        return ["plot", str(case.fixtures["run"]), "--out", str(case.tmp / name)]
    return fault


def stats_plot(name: str):
    def fault(case: Case) -> list[str]:
        return ["stats", str(case.fixtures["shared_cache"]), "--sample-rows", "2", "--plot", str(case.tmp / name)]
    return fault


def nothing_drawn(case: Case) -> None:
    left = [p.name for p in case.tmp.iterdir()]
    assert not left, left


def drawn_as(name: str, fmt: str):
    """`name` holds an image of format `fmt` (by its bytes, not its name), signed as tcache's, no .partial left."""
    def check(case: Case) -> None:
        from PIL import Image

        from tcache import pngs

        path = case.tmp / name
        data = path.read_bytes()
        if fmt == "PDF":
            assert data.startswith(b"%PDF-"), data[:16]
        elif fmt == "SVG":
            assert data.startswith(b"<?xml") and b"<svg" in data[:2000], data[:80]
        else:
            with Image.open(path) as im:
                assert im.format == fmt, im.format
        assert pngs.written_by_tcache(path)
        assert not list(case.tmp.glob("*.partial"))
    return check


def build_from_a_truncated_teacher(case: Case) -> list[str]:
    """A copy of the tiny teacher whose weight file was cut in half (a download or copy cut short)."""
    teacher = case.tmp / "teacher"
    shutil.copytree(case.fixtures["tiny_teacher"], teacher)
    weights = sorted(teacher.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    return ["build", "--teacher", str(teacher), "--data", str(case.fixtures["valid_jsonl"]), "--tokens", "1k",
            "--seq-len", "64", "--top-k", "4", "--device", "cpu", "--out", str(case.tmp / "c")]
