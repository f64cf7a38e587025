"""Interrupted builds: kill -9 / SIGTERM / SIGINT / a full disk leave a resumable state, never a cache,
and `--resume` gives shards byte-identical to an uninterrupted build; --overwrite never loses data."""

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

from conftest import REPO, text_head
from independent_check import assert_same_files
from tcache.teachercache import schema
from tcache.teachercache.manifest import load_manifest
from test_cli_build import assert_clean_error, run

# A build slow enough on CPU to be stopped at many points: the shared teacher, 28 rows of 128 tokens in
# 14 shards of 2 rows; batches of 3 rows, so a shard boundary falls inside a batch (the resume must start
# at the batch boundary of the uninterrupted build and drop the rows already in complete shards).
ROWS, SEQ, PER_SHARD, BATCH = 28, 128, 2, 3


def build_args(teacher_dir, valid_jsonl, out, *extra):
    return ["build", "--teacher", teacher_dir, "--data", valid_jsonl, "--tokens", ROWS * SEQ, "--seq-len", SEQ,
            "--top-k", 8, "--batch-size", BATCH, "--shard-rows", PER_SHARD, "--device", "cpu", "--out", out,
            *extra]


def spawn(args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tcache", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def children(pid: int) -> list[int]:
    """Every descendant process of `pid` (from /proc, so the test needs no psutil)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def workers(pid: int) -> list[int]:
    """The tokenizer pool's worker processes under `pid`: multiprocessing's spawned children (the resource
    tracker, also a child, is not one)."""
    out = []
    for k in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes():
                out.append(k)
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def complete_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "build-state.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def stop_when(proc: subprocess.Popen, out: Path, shards: int, sig: int, timeout: float = 120,
              n_workers: int = 0) -> tuple[list[int], list[int]]:
    """Send `sig` once the build state lists at least `shards` complete shards and `n_workers` tokenizer
    workers run. Returns (every descendant, the tokenizer workers among them), both taken just before it."""
    t = time.time()
    while complete_shards(out) < shards or len(pool := workers(proc.pid) if n_workers else []) < n_workers:
        assert proc.poll() is None, f"the build ended before it could be stopped: {proc.communicate()}"
        assert time.time() - t < timeout
        time.sleep(0.01)
    kids = children(proc.pid)
    proc.send_signal(sig)
    return kids, [k for k in pool if k in kids]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, valid_jsonl) -> Path:
    """The first 20k characters of three held-out books: each build process would otherwise tokenise all
    of valid.jsonl (4 MB, ~10 s on 2 cores) before its first row."""
    return text_head(valid_jsonl, tmp_path_factory.mktemp("text") / "small.jsonl", 20_000)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, small_text):
    out = tmp_path_factory.mktemp("ref") / "cache"
    r = run(*build_args(teacher_dir, small_text, out))
    assert r.exit_code == 0, r.output
    return out


def test_kill_9_at_three_points_then_resume_is_byte_identical(tmp_path, teacher_dir, small_text, reference):
    """One build, killed with SIGKILL three times (after 1, 5 and 9 complete shards, wherever the writer is; each kill
    is a fresh process loading torch and the teacher, ~8 s of the suite on 2 cores),
    each time resumed; tokenizer worker processes die with their parent (both workers are seen running before
    each kill, so "none outlived it" is not vacuous). The resumed cache's shard and teacher files are rehashed
    from disk against the uninterrupted build's: a resume that flipped a byte of shard 0 right after adopting it
    kept the recorded digest in the manifest, and fails here."""
    out = tmp_path / "cache"
    args = build_args(teacher_dir, small_text, out, "--tokenizer-workers", 2)
    kills = 0
    for target in (1, 5, 9):
        proc = spawn(args + (["--resume"] if kills else []))
        t = time.time()
        pool: list[int] = []
        while ((complete_shards(out) < target or len(pool := workers(proc.pid)) < 2) and proc.poll() is None
               and time.time() - t < 120):
            time.sleep(0.005)
        kids = children(proc.pid)  # every descendant: the workers and multiprocessing's resource tracker
        proc.kill()
        proc.communicate()
        if complete_shards(out) >= target and not (out / schema.MANIFEST_FILE).exists():
            kills += 1
            assert len([k for k in pool if k in kids]) == 2, f"kill {target}: 2 tokenizer workers were not running"
        deadline = time.time() + 5
        while any(alive(k) for k in kids) and time.time() < deadline:
            time.sleep(0.05)
        assert not [k for k in kids if alive(k)], "worker processes outlived a kill -9 of the build"
        assert not (out / schema.MANIFEST_FILE).exists()
    assert kills == 3
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    resumed = load_manifest(out)
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in load_manifest(reference).shards]
    assert resumed.teacher_files == load_manifest(reference).teacher_files
    assert_same_files(out, reference)
    assert not (out / "build-state.json").exists() and not list(out.glob("*.partial"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_cleanly_and_prints_the_resume_command(tmp_path, teacher_dir, small_text, reference, sig, code):
    """Stopped by the signal after 2 complete shards, with both tokenizer workers seen running just before it:
    exit 128 + signal, one resume line, no worker outlives the build; --resume then gives shard and teacher
    files byte for byte the uninterrupted build's (rehashed from disk, not the manifests' digests, which a
    resume that flipped a byte of shard 0 right after adopting it still matched)."""
    out = tmp_path / "cache"
    args = build_args(teacher_dir, small_text, out, "--tokenizer-workers", 2)
    proc = spawn(args)
    kids, pool = stop_when(proc, out, 2, sig, n_workers=2)
    assert len(pool) == 2, (kids, pool)  # both tokenizer workers ran when the signal came
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and f"Stopped by {signal.Signals(sig).name}" in err
    assert "Resume with: tcache build" in err and "--resume" in err
    time.sleep(0.5)
    assert not [k for k in kids if alive(k)], "worker processes outlived the build"
    assert not (out / schema.MANIFEST_FILE).exists() and not list(out.glob("*.partial"))
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert [s.sha256 for s in load_manifest(out).shards] == [s.sha256 for s in load_manifest(reference).shards]
    assert_same_files(out, reference)


def test_resume_refuses_other_options_and_needs_a_state(tmp_path, teacher_dir, small_text):
    out = tmp_path / "cache"
    assert_clean_error(run(*build_args(teacher_dir, small_text, out, "--resume")), "--resume", "no interrupted build")
    proc = spawn(build_args(teacher_dir, small_text, out))
    stop_when(proc, out, 1, signal.SIGKILL)
    proc.communicate()
    other = build_args(teacher_dir, small_text, out, "--resume")
    other[other.index("--top-k") + 1] = 4
    assert_clean_error(run(*other), "--resume", "top_k (8 -> 4)")
    assert_clean_error(run(*build_args(teacher_dir, small_text, out)), "interrupted build", "--resume")


# SIGINT only: SIGTERM reaches the same handler (tcache.signals), and each signal is tested through a whole build by
# test_signal_stops_cleanly_and_prints_the_resume_command and through an overwrite by test_distill_safety (12 s a run)
@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_interrupted_overwrite_keeps_the_old_cache(tmp_path, teacher_dir, small_text, reference, sig):
    """--overwrite builds beside the old cache: stopped, the old cache still verifies; resumed, the new
    cache replaces it."""
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    old = {s.file: s.sha256 for s in load_manifest(out).shards}
    args = build_args(teacher_dir, small_text, out, "--overwrite", "--top-k", 4)
    args.remove("--top-k"), args.remove(8)
    proc = spawn(args)
    stop_when(proc, out.parent / ".cache.tcache-new", 1, sig)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    from tcache.teachercache.verify import verify_cache

    m = load_manifest(out)
    assert verify_cache(out)["ok"] and {s.file: s.sha256 for s in m.shards} == old and m.top_k == 8
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert load_manifest(out).top_k == 4 and not (out.parent / ".cache.tcache-new").exists()


def test_no_room_refused_up_front_and_full_disk_is_one_line(tmp_path, tiny_teacher, small_text, monkeypatch):
    """Up front: the bytes needed against the free bytes. While writing (another writer filled the disk,
    injected here as ENOSPC from h5py): one line, exit != 0, the complete shards kept for --resume."""
    import errno

    import tcache.outdir as outdir
    import tcache.teachercache.writer as writer

    base = ["build", "--teacher", tiny_teacher, "--data", small_text, "--seq-len", 64, "--top-k", 4,
            "--device", "cpu", "--shard-rows", 2, "--batch-size", 2]
    monkeypatch.setattr(outdir, "free_bytes", lambda path: 3 * 2**20)
    r = run(*base, "--tokens", "20k", "--out", tmp_path / "a")
    assert_clean_error(r, "needs", "3.0 MiB free", "--tokens")
    assert not (tmp_path / "a").exists()
    r = run("plan", *base[1:], "--tokens", "20k", "--out", tmp_path / "a")  # plan says so too
    assert_clean_error(r, "needs", "3.00 MiB free", "--tokens")
    monkeypatch.undo()

    real_close = writer.h5py.File.close
    closes = {"n": 0}

    def full_disk(self):
        closes["n"] += 1
        if closes["n"] == 3:
            real_close(self)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_close(self)

    monkeypatch.setattr(writer.h5py.File, "close", full_disk)
    out = tmp_path / "b"
    r = run(*base, "--tokens", 16 * 64, "--out", out)
    assert_clean_error(r, "disk is full", "2 complete shard(s)", "--resume")
    assert not (out / schema.MANIFEST_FILE).exists() and len(list(out.glob("shard-*.h5"))) == 2


def test_real_full_disk_in_a_small_tmpfs(tmp_path, tiny_teacher, small_text):
    """A real full filesystem (an 11 MiB tmpfs: the tiny teacher's files take 9 MiB of it; needs root): refused up
    front when the need is known, and a clean one-line error, no segfault, when something else fills it during
    the build."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(mnt)],
                                            capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        args = ["build", "--teacher", tiny_teacher, "--data", small_text, "--seq-len", 64, "--top-k", 64,
                "--hidden-dtype", "fp16", "--device", "cpu", "--shard-rows", 16, "--out", mnt / "c"]
        p = subprocess.run([sys.executable, "-m", "tcache", *map(str, args), "--tokens", "200k"],
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert p.returncode == 1 and "needs" in p.stderr and "free" in p.stderr and "Traceback" not in p.stderr
        # the disk fills during the build: the up-front check is switched off (as for a filesystem that
        # misreports its free space), so the build meets ENOSPC while writing shards
        env = {**os.environ, "PYTHONPATH": str(REPO), "TCACHE_NO_SPACE_CHECK": "1"}
        p = subprocess.run([sys.executable, "-m", "tcache", *map(str, args), "--tokens", "200k"], env=env,
                           capture_output=True, text=True)
        assert p.returncode == 1, p.stderr
        errors = [x for x in p.stderr.splitlines() if x.startswith("Error:")]
        assert len(errors) == 1 and "disk is full" in errors[0] and "Traceback" not in p.stderr, p.stderr
        assert "--resume" in errors[0] and not (mnt / "c" / schema.MANIFEST_FILE).exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_torchrun_build_stopped_then_resumed_per_rank(tmp_path, teacher_dir, small_text, reference):
    """`torchrun --nproc_per_node 2 ... build`, SIGTERM once each rank has a complete shard: no cache, each rank's
    share keeps its state; the same command with --resume continues every rank and merges one cache, with the
    rows of the single-process build."""
    import numpy as np

    out = tmp_path / "cache"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tcache"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [str(a) for a in build_args(teacher_dir, small_text, out)]
    proc = subprocess.Popen(launcher + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.time()
    while min(complete_shards(out / ".rank-0"), complete_shards(out / ".rank-1")) < 1:
        assert proc.poll() is None, f"the build ended before it could be stopped: {proc.communicate()[1][-2000:]}"
        assert time.time() - t < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (out / schema.MANIFEST_FILE).exists()
    assert all((out / f".rank-{r}" / "build-state.json").exists() or (out / f".rank-{r}" / "manifest.json").exists()
               for r in (0, 1))
    p = subprocess.run(launcher + args + ["--resume"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    m, ref = load_manifest(out), load_manifest(reference)
    assert m.build["world_size"] == 2 and [s.rows for s in m.shards] == [s.rows for s in ref.shards]
    assert not list(out.glob(".rank-*"))
    import h5py

    for a, b in zip(m.shards, ref.shards):
        with h5py.File(out / a.file) as fa, h5py.File(reference / b.file) as fb:
            assert np.array_equal(fa[schema.INPUT_IDS][...], fb[schema.INPUT_IDS][...])
