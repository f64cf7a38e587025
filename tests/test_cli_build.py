"""`tcache build` / `tcache stats` through click: the happy path and every bad input of the issue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tcache.cli.main import main
from tcache.teachercache import schema
from tcache.teachercache.manifest import load_manifest


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, *fragments):
    """Non-zero exit, one `Error:` line naming the problem, no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for frag in fragments:
        assert frag in errors[0], errors[0]


def assert_no_cache(path):
    assert not (path / schema.MANIFEST_FILE).exists()
    assert not list(path.glob("shard-*")) if path.exists() else True


@pytest.fixture
def tiny_args(tiny_teacher, valid_jsonl):
    return ["build", "--teacher", tiny_teacher, "--data", valid_jsonl, "--seq-len", 64, "--top-k", 4,
            "--device", "cpu"]


def test_build_then_stats(tmp_path, tiny_args):
    out = tmp_path / "c"
    r = run(*tiny_args, "--tokens", "0.3k", "--out", out)
    assert r.exit_code == 0, r.output
    assert "cache written" in r.output
    r = run("stats", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["tokens"] == 256 and s["rows"] == 4 and s["top_k"] == 4 and s["seq_len"] == 64
    # bytes per token by field follow from the dtypes: nf4 hidden (D=32: 16 B) + one fp16 scale per 32 values,
    # uint16 ids, fp16 log-probs
    assert s["fields"]["hidden"]["bytes_per_token"] == 16 and s["fields"]["hidden_scale"]["bytes_per_token"] == 2
    assert s["fields"]["topk_logprobs"]["bytes_per_token"] == 2 * 4
    assert s["fields"]["topk_ids"]["bytes_per_token"] == 2 * 4
    assert 0 < s["topk_mass"]["p1"] <= s["topk_mass"]["p50"] <= s["topk_mass"]["p99"] <= 1 + 1e-6
    # every file, weights included (safetensors writes 0600), is as readable as a plain open() makes it
    from tcache.outdir import _umask

    modes = {f.relative_to(out).as_posix(): f.stat().st_mode & 0o777 for f in out.rglob("*") if f.is_file()}
    assert "teacher/model.safetensors" in modes and set(modes.values()) == {0o666 & ~_umask()}, modes
    for bad in ("-5", "0"):  # no statistics of zero rows (they read as a hidden RMS of 0.0000)
        assert_clean_error(run("stats", out, "--sample-rows", bad), "--sample-rows must be at least 1")
    r = run("stats", out)
    assert r.exit_code == 0 and "top-k probability mass" in r.output and "hidden RMS" in r.output


def test_stats_values_match_raw_file(shared_cache):
    """Mass and RMS recomputed from the raw shards with h5py."""
    from independent_check import decode_nf4, read_cache
    import numpy as np

    r = run("stats", shared_cache, "--json")
    s = json.loads(r.output)
    _, raw = read_cache(shared_cache)
    mass = np.exp(raw["topk_logprobs"].astype(np.float64)).sum(-1).ravel()
    assert s["topk_mass"]["mean"] == pytest.approx(mass.mean(), rel=1e-6)
    assert s["topk_mass"]["p5"] == pytest.approx(np.percentile(mass, 5), rel=1e-9)
    h = decode_nf4(raw["hidden"], raw["hidden_scale"])  # the default nf4 hidden
    rms = np.sqrt((h ** 2).mean())
    assert s["hidden_rms"][0] == pytest.approx(rms, rel=1e-6)


def test_tokens_beyond_data_builds_what_there_is(tmp_path, tiny_teacher):
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 20})
                              for _ in range(5)))
    out = tmp_path / "c"
    r = run("build", "--teacher", tiny_teacher, "--data", data, "--tokens", "1M", "--seq-len", 64,
            "--top-k", 4, "--out", out)
    assert r.exit_code == 0, r.output
    assert "held only" in r.output
    m = load_manifest(out)
    assert m.data_exhausted and m.tokens_requested == 10**6
    assert 0 < m.tokens < 5 * 20 * 12 and m.tokens % 64 == 0


def test_plan_reports_exact_bytes_and_an_estimate(tmp_path, tiny_args):
    r = run("plan", *tiny_args[1:], "--tokens", "1M", "--out", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    # nf4 hidden D=32 (16 B) + one fp16 scale + top-4 fp16 log-probs + top-4 uint16 ids + uint16 input id
    assert p["bytes_per_token"] == 16 + 2 + 2 * 4 + 2 * 4 + 2
    assert p["total_bytes"] == int(p["bytes_per_token"] * p["tokens"]) + p["teacher_files_bytes"]
    assert p["tokens"] == (10**6 // 64) * 64 and p["estimated_seconds"] > 0
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".tcache-plan-*"))  # a plan writes nothing


def test_plan_needs_no_out(tmp_path, tiny_args, monkeypatch):
    """Without --out a plan measures for ./cache (the current directory's filesystem) and leaves nothing."""
    monkeypatch.chdir(tmp_path)
    r = run("plan", *tiny_args[1:], "--tokens", "20k", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["disk_free_bytes"] > 0 and list(tmp_path.iterdir()) == []


def test_unreadable_data_is_one_line_naming_file_and_line(tmp_path, tiny_args, valid_jsonl):
    """A malformed JSON line (here after a good one, in a .gz) and bytes that are not UTF-8 (a .txt): one error
    line with the file and the line number, and no output left behind."""
    import gzip

    good = json.loads(valid_jsonl.read_text().splitlines()[0])["text"][:3000]
    bad_json = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad_json, "wt") as f:
        f.write(json.dumps({"text": good}) + "\n" + '{"text": "ok"} trailing\n')
    bad_txt = tmp_path / "bad.txt"
    bad_txt.write_bytes(good.encode() + b"\n\xff\xfe not utf-8\n")
    bad_line = good.count("\n") + 2  # the book's paragraphs are lines of the .txt
    for data, fragment in ((bad_json, "line 2 is not valid JSON"), (bad_txt, f"line {bad_line} is not UTF-8 (byte 0xff")):
        args = [a if a != tiny_args[tiny_args.index("--data") + 1] else data for a in tiny_args]
        r = run(*args, "--tokens", "20k", "--out", tmp_path / "c")
        assert_clean_error(r, f"--data {data}: {fragment}")
        assert not (tmp_path / "c").exists()


def test_an_unwritable_out_is_refused_before_the_teacher_loads(tmp_path, tiny_args, monkeypatch):
    """/proc, and (as root) a read-only mount: one line naming --out, before any model is loaded."""
    import os
    import subprocess

    import tcache.teachercache.setup as setup

    monkeypatch.setattr(setup, "load_model", lambda *a, **k: pytest.fail("the teacher loaded"))
    targets = [Path("/proc/tcache-test/c")]
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                                                    capture_output=True).returncode == 0
    if mounted:
        targets.append(ro / "c")
    try:
        for out in targets:
            assert_clean_error(run(*tiny_args, "--tokens", "1k", "--out", out), f"--out {out} is not writable")
            # distill checks --out before it reads the cache or builds the student
            assert_clean_error(run("distill", tmp_path / "no-cache", "--out", out), f"--out {out} is not writable")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)])
