"""`tcache plan` runs the build's own loop on a few batches: its time estimate matches the build it plans."""

from __future__ import annotations

import pytest
import torch

from conftest import text_head
from tcache.teachercache.build import build
from tcache.teachercache.config import BuildConfig
from tcache.teachercache.plan import plan
from tcache.text import DataSpec

# The shared teacher on CPU: 128 rows of 128 tokens in batches of 4 (32 batches, ~20 s), so the build's fixed
# costs (teacher files, the warm-up batch) are a small part and per-batch jitter averages out.
ROWS, SEQ, BATCH = 128, 128, 4


@pytest.fixture
def one_thread():
    """One torch thread for plan and build alike: on a 2-core machine shared with other work, a 2-thread
    teacher slows down several times over whenever another process takes a core (measured: 0.35 s -> 3 s a
    batch), which is noise no estimate can foresee; one thread keeps a core to itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_plan_estimate_is_within_20_percent_of_the_build_loop(tmp_path, teacher_dir, valid_jsonl, one_thread):
    data = text_head(valid_jsonl, tmp_path / "text.jsonl", 40_000)
    cfg = dict(teacher=str(teacher_dir), data=DataSpec(str(data)), out=str(tmp_path / "cache"), tokens=ROWS * SEQ,
               seq_len=SEQ, top_k=32, batch_size=BATCH, rows_per_shard=64, device="cpu")
    p = plan(BuildConfig(**cfg))
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob(".tcache-plan-*"))  # nothing is left
    assert p["measured"]["batches"] >= 5 and p["measured"]["tokens"] == p["measured"]["batches"] * BATCH * SEQ
    m = build(BuildConfig(**cfg))
    assert m.rows == ROWS
    measured = m.build["seconds"]  # the loop's seconds: writer open to the last shard hashed
    assert abs(p["estimated_seconds"] - measured) <= 0.2 * measured, (p["estimated_seconds"], measured, p["measured"])
