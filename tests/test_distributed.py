"""tcache distill under torchrun (2 CPU processes, gloo): the same global batch gives the same losses as one process,
and a 2-rank run's checkpoint continues on 1 rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import text_head

T = 32


@pytest.fixture(scope="module")
def cache(rank_cache):
    return rank_cache  # conftest's; T is its sequence length


def distill(cache, out, *args, ranks: int = 1):
    """`tcache distill` as a user runs it: plain, or under `torchrun --nproc_per_node RANKS`."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    cmd = launcher + ["-m", "tcache", "distill", str(cache), "--recipe", "v2", "--out", str(out), "--device", "cpu",
                      "--precision", "fp32", "--grad-accum", "1", "--lr", "3e-3", "--seed", "0", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TERMS = ("loss", "ce", "kd", "align", "grad_norm")


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in TERMS:
            assert ra[k] == pytest.approx(rb[k], abs=1e-5, rel=1e-5), (ra["step"], k)
        assert ra["tokens"] == rb["tokens"]


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """One process at batch 8 and two ranks at batch 4 (a checkpoint at step 2), 4 steps each: (dir, metrics)."""
    root = tmp_path_factory.mktemp("runs")
    one = distill(cache, root / "one", "--batch-size", 8, "--steps", 4)
    two = distill(cache, root / "two", "--batch-size", 4, "--steps", 4, "--ckpt-every", 2, ranks=2)
    return {"one": (root / "one", one), "two": (root / "two", two)}


def test_two_ranks_at_batch_4_train_as_one_process_at_batch_8(runs):
    one, two = runs["one"][1], runs["two"][1]
    assert len(one) == 4 and one[0]["loss"] != one[-1]["loss"]
    assert_same(two, one)
    assert (runs["two"][0] / "student.json").exists()


def test_a_two_rank_checkpoint_continues_on_one_rank(cache, runs):
    """The 2-rank run keeps its step-2 checkpoint; resumed on 1 rank at the same global batch it retrains steps 3
    and 4 with the same losses."""
    run_dir, two = runs["two"]
    resumed = distill(cache, run_dir, "--batch-size", 8, "--steps", 4, "--ckpt-every", 2, "--resume")
    assert_same(resumed, two)


def test_two_rank_eval_scores_the_same_windows_as_one_process(runs, tmp_path, valid_jsonl):
    text = text_head(valid_jsonl, tmp_path / "head.jsonl", 6000)
    results = []
    for ranks in (1, 2):
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                    if ranks > 1 else [sys.executable])
        p = subprocess.run(launcher + ["-m", "tcache", "eval", str(runs["one"][0]), "--data", str(text), "--seq-len",
                                       "32", "--tokens", "640", "--batch-size", "4", "--device", "cpu", "--json"],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0, p.stderr[-3000:]
        results.append(json.loads(p.stdout))
    one, two = results
    assert two["ranks"] == 2 and one["windows"] == two["windows"] == 20
    assert one["tokens_scored"] == two["tokens_scored"]
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)


def _rows(cache) -> dict[str, "np.ndarray"]:
    import h5py
    import numpy as np

    from tcache.teachercache.manifest import load_manifest

    m = load_manifest(cache)
    out: dict[str, list] = {}
    for sh in m.shards:
        with h5py.File(cache / sh.file) as f:
            for name in f:
                out.setdefault(name, []).append(f[name][...])
    return {k: np.concatenate(v) for k, v in out.items()}


def test_two_rank_build_equals_one_process_build(tiny_teacher, valid_jsonl, tmp_path):
    """torchrun --nproc_per_node 2 tcache build: 4 shards of 4 rows (the last 2), interleaved between the ranks;
    the same shards as one process's, byte for byte, and one manifest naming each shard's rank."""
    import numpy as np

    from tcache.teachercache.manifest import load_manifest

    text = text_head(valid_jsonl, tmp_path / "head.jsonl", 8000)
    args = ["-m", "tcache", "build", "--teacher", str(tiny_teacher), "--data", str(text), "--tokens", str(14 * T),
            "--seq-len", str(T), "--top-k", "8", "--batch-size", "2", "--shard-rows", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, launcher in ((tmp_path / "one", [sys.executable]),
                          (tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node=2"])):
        p = subprocess.run(launcher + args + ["--out", str(out)], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stderr.count("cache written") == 1  # rank 0 reports for both
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert [s.rows for s in two.shards] == [s.rows for s in one.shards] == [4, 4, 4, 2]
    assert two.build["world_size"] == 2 and two.build["shard_ranks"] == [0, 1, 0, 1]
    assert two.rows == one.rows == 14 and sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    # every shard starts at a batch boundary of the single build too (4 rows, batches of 2): every batch holds the
    # same rows, so on CPU the teacher computes the same bits and every field is byte-equal (the same sha256)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [s.sha256 for s in two.shards] == [s.sha256 for s in one.shards]
