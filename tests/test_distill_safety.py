"""Distill runs that are interrupted, resumed, overwritten or fed a damaged cache: no data lost, no
silent mixing, exact resumption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, build_cache
from promises import Case
from tcache.student.training.config import DistillConfig
from tcache.student.training.train import distill
from test_cli_build import assert_clean_error, run


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher, valid_jsonl):
    out = tmp_path_factory.mktemp("caches") / "tiny"
    build_cache(out, tiny_teacher, valid_jsonl, tokens=24 * 64, seq_len=64, top_k=8, batch_size=8, rows_per_shard=8)
    return out


BASE = dict(steps=6, batch_size=2, grad_accum=2, lr=1e-3, seed=3, blocks=2, ckpt_every=2)


def cli_args(cache, out, *extra):
    return ["distill", cache, "--out", out, "--steps", 6, "--batch-size", 2, "--grad-accum", 2, "--lr", 1e-3,
            "--seed", 3, "--blocks", 2, "--ckpt-every", 2, "--device", "cpu", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def spawn(args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tcache", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("runs") / "full"
    distill(DistillConfig(cache=str(cache), out=str(out), **BASE))
    return out


def same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("ce", "kd", "align", "loss", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), (k, ra, rb)


def test_kill_9_after_a_checkpoint_then_resume_gives_the_same_losses(tmp_path, cache, uninterrupted):
    out = tmp_path / "run"
    proc = spawn(cli_args(cache, out))
    wait_for(out / "checkpoints" / "step-0000004", proc)
    proc.kill()
    proc.communicate()
    assert not (out / "student.json").exists()
    r = run(*cli_args(cache, out, "--resume"))
    assert r.exit_code == 0, r.output
    same_losses(metrics(uninterrupted), metrics(out))


def test_resume_skips_a_torn_checkpoint_and_a_torn_metrics_line(tmp_path, cache, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for f in ("student.json", "model.safetensors"):
        (out / f).unlink()
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    w = newest / "trainable.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # a truncated newest checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "ce": 1.')  # a torn last line
    r = run(*cli_args(cache, out, "--resume"))
    assert r.exit_code == 0, r.output
    assert f"checkpoint {newest.name} does not load" in r.output
    same_losses(metrics(uninterrupted), metrics(out))


def test_resume_refuses_another_cache(tmp_path, cache, tiny_teacher, valid_jsonl, uninterrupted):
    other = tmp_path / "other"
    build_cache(other, tiny_teacher, valid_jsonl, tokens=24 * 64, seq_len=64, top_k=8, batch_size=8,
                rows_per_shard=8, hidden_dtype="int8")
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    assert_clean_error(run(*cli_args(other, out, "--resume")), "--resume", "another cache")


# SIGTERM (a scheduler's preemption) only: SIGINT reaches the same handler (tcache.signals), tested with both signals
# through whole builds (test_build_resume) and generate (test_reliability); 10 s of the suite each
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)])
def test_signal_during_overwrite_keeps_the_old_student(tmp_path, cache, uninterrupted, sig, code):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    user = Case(tmp_path, {})  # the user's files beside the run survive the overwrite, byte for byte
    user.user("notes.txt"), user.user("runs/other/model.safetensors", b"another model")
    before = (out / "model.safetensors").read_bytes()
    args = cli_args(cache, out, "--overwrite", "--lr", 3e-3)
    args.remove("--lr"), args.remove(1e-3)
    proc = spawn(args)
    stage = out.parent / ".run.tcache-new"
    wait_for(stage / "metrics.jsonl", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Resume with: tcache distill" in err, err
    assert (out / "model.safetensors").read_bytes() == before  # the old student, untouched
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").read_bytes() != before and not stage.exists()
    assert json.loads((out / "student.json").read_text())["trained"]["steps"] == 6
    user.check_owned()


def test_corrupt_or_missing_shard_is_refused(tmp_path, cache):
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    shard = bad / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "run"
    assert_clean_error(run(*cli_args(bad, out)), "shard-00001.h5", "sha256")
    assert not (out / "student.json").exists()
    shard.rename(bad / "renamed.h5")
    for cmd in (cli_args(bad, tmp_path / "run2"), ["stats", bad], ["verify", bad]):
        assert_clean_error(run(*cmd), "shard-00001.h5", "missing")
