"""The list of promises: every fault a user can meet, one row each (tests/promises.py: the command, the fault, the
exit code, the one line it ends with), and after every row each file the user owned before is still there, byte
for byte. Read the ROWS as the contract; the fault functions above them say how each fault is made."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, build_cache, text_head
import faults_disk as fd
import faults_generate as fg
import faults_cache as fc
import faults_inputs as fi
from promises import STOP_WITHIN, Case, Interrupt, Promise, interrupt, invoke, regex

MARKER = ".tcache-output.json"  # tcache.ownership.MARKER, spelled out so the rows also run against older code

T = 32  # the tiny students' training length


# -- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_teacher, teacher_dir, valid_jsonl, shared_cache):
    """Session fixtures by name, plus a tiny cache and a tiny distill run made once for the rows."""
    from tcache.student.training.config import DistillConfig
    from tcache.student.training.train import distill

    root = tmp_path_factory.mktemp("promises")
    text = text_head(valid_jsonl, root / "text.jsonl", 8000)
    cache = root / "cache"
    build_cache(cache, tiny_teacher, text, tokens=8 * T, seq_len=T, top_k=8, batch_size=8, rows_per_shard=4)
    run = root / "run"
    distill(DistillConfig(cache=str(cache), out=str(run), recipe="v2", steps=2, batch_size=2, grad_accum=1,
                          seed=0, device="cpu"))
    from click.testing import CliRunner

    from tcache.cli.main import main

    r = CliRunner().invoke(main, ["export", str(run), "--out", str(root / "export")])
    assert r.exit_code == 0, r.output
    return {"tiny_teacher": tiny_teacher, "teacher_dir": teacher_dir, "valid_jsonl": valid_jsonl, "text": text,
            "shared_cache": shared_cache, "cache": cache, "run": run, "export": root / "export"}


SHARED_OUTPUTS = ("shared_cache", "cache", "run", "export")  # rows work on copies: these must never change


def fingerprint(fixtures: dict) -> dict[Path, bytes]:
    return {p: p.read_bytes() for k in SHARED_OUTPUTS for p in Path(fixtures[k]).rglob("*") if p.is_file()}


def build_args(case: Case, out: Path, *extra) -> list[str]:
    f = case.fixtures
    return ["build", "--teacher", str(f["tiny_teacher"]), "--data", str(f["text"]), "--tokens", str(4 * T),
            "--seq-len", str(T), "--top-k", "4", "--device", "cpu", "--out", str(out), *map(str, extra)]


def distill_args(case: Case, out: Path, *extra) -> list[str]:
    return ["distill", str(case.fixtures["cache"]), "--out", str(out), "--recipe", "v2", "--steps", "1",
            "--batch-size", "2", "--grad-accum", "1", "--device", "cpu", *map(str, extra)]


def copy_of(case: Case, name: str, legacy: bool = False) -> Path:
    """A copy of a fixture output tcache wrote; `legacy`: without its marker, as tcache 0.1.0 left it."""
    dst = case.tmp / name
    shutil.copytree(case.fixtures[name], dst)
    if legacy:
        (dst / MARKER).unlink()
    return dst


def hold_lock(case: Case, out: Path) -> subprocess.Popen:
    """Another process holding --out's lock (it prints 'locked' once it holds it)."""
    code = f"import sys,time; from tcache.locks import locked\nwith locked({str(out)!r}):\n print('locked', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    case.fixtures["finalizers"].append(proc.kill)
    return proc


# -- faults: --overwrite and ownership (issue 21: 1-3, 13) ------------------------------------------------------
def project_folder(case: Case, *extra) -> list[str]:
    """The user's own project folder: their model in teacher/ and a hand-written config.yaml."""
    case.user("P/teacher/notes.txt", "my notes\n")
    case.user("P/config.yaml", "x: 1\n")
    return build_args(case, case.tmp / "P", *extra)


def model_folder(case: Case) -> list[str]:
    """A folder of the user's that happens to use the names a run writes."""
    for name in ("metrics.jsonl", "config.json", "model.safetensors"):
        case.user(f"D/{name}", f"the user's {name}\n")
    return distill_args(case, case.tmp / "D", "--overwrite")


def marked_cache_with_a_user_file(case: Case) -> list[str]:
    out = copy_of(case, "cache")
    case.user("cache/notes.txt", "added by the user after the build\n")
    return build_args(case, out, "--overwrite")


def legacy_cache(case: Case) -> list[str]:
    return build_args(case, copy_of(case, "cache", legacy=True), "--overwrite")


def legacy_cache_with_a_user_file(case: Case) -> list[str]:
    out = copy_of(case, "cache", legacy=True)
    case.user("cache/notes.txt", "mine\n")
    return build_args(case, out, "--overwrite")


def cache_lookalike(case: Case) -> list[str]:
    """Names a cache uses, content that is not tcache's: no proof, so not tcache's to replace."""
    case.user("L/manifest.json", json.dumps({"format": "my-own", "shards": []}))
    case.user("L/shard-00000.h5", b"\x89HDF my data")
    return build_args(case, case.tmp / "L", "--overwrite")


def legacy_run(case: Case) -> list[str]:
    return distill_args(case, copy_of(case, "run", legacy=True), "--overwrite")


def export_into(target: str):
    def fault(case: Case) -> list[str]:
        if target == "cache":
            out = copy_of(case, "cache")
            case.own_all(out)  # not the export's to replace: every byte must stay
        else:
            out = case.tmp / "mine"
            case.user("mine/notes.txt", "keep me\n")
        return ["export", str(case.fixtures["run"]), "--out", str(out), "--overwrite"]
    return fault


def marker_lists_what_is_there(name: str, kind: str):
    def check(case: Case) -> None:
        from tcache import ownership

        out = case.tmp / name
        doc = ownership.read(out)
        assert doc is not None and doc["kind"] == kind, doc
        assert sorted(doc["files"]) == sorted(p.name for p in out.iterdir() if p.name != MARKER)
    return check


def marker_rewrite_cut_short(where: str):
    """kill -9 while tcache rewrote its marker leaves the marker's temporary: in a cache (between two shards), or
    alone (the very first claim of a new --out)."""
    def fault(case: Case) -> list[str]:
        out = copy_of(case, "cache") if where == "cache" else case.tmp / "new"
        out.mkdir(exist_ok=True)
        (out / (MARKER + ".partial")).write_text('{"format": "tcache-out')  # torn
        return build_args(case, out, *(["--overwrite"] if where == "cache" else []))
    return fault


def cache_still_verifies(case: Case) -> None:
    from tcache.teachercache.verify import verify_cache

    assert verify_cache(case.tmp / "cache")["ok"]


# -- faults: locks (issue 21: 4) ---------------------------------------------------------------------------------
def build_while_locked(case: Case) -> list[str]:
    out = case.tmp / "c"
    holder = hold_lock(case, out)
    case.fixtures["holder_pid"] = holder.pid
    return build_args(case, out)


def lock_of_a_killed_process(case: Case) -> list[str]:
    out = case.tmp / "c"
    holder = hold_lock(case, out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out.parent / f".{out.name}.tcache-lock").exists()  # left behind, as kill -9 leaves it
    return build_args(case, out)


def distill_while_locked(case: Case) -> list[str]:
    out = case.tmp / "r"
    hold_lock(case, out)
    return distill_args(case, out)


def export_while_locked(case: Case) -> list[str]:
    out = case.tmp / "hf"
    hold_lock(case, out)
    return ["export", str(case.fixtures["run"]), "--out", str(out)]


# -- faults: disk space (issue 21: 6) ----------------------------------------------------------------------------
def resume_after_a_full_disk(case: Case) -> list[str]:
    """A build stopped by a full disk after its first shard, then space freed: enough for the rest, less than the
    whole build (teacher files included) needs."""
    import tcache.outdir
    import tcache.teachercache.writer as writer

    mp, out = case.fixtures["monkeypatch"], case.tmp / "c"
    args = build_args(case, out, "--shard-rows", 2, "--batch-size", 2)
    calls = {"n": 0}

    def filling(path):  # the writer's own check before each shard: room for the first, then none
        calls["n"] += 1
        return 2**40 if calls["n"] == 1 else 0

    mp.setattr(writer, "free_bytes", filling)
    r = invoke(args, case, False, 60)
    assert r.code == 1 and "rerun with --resume" in r.output, r.output
    mp.undo()
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shard = (out / "shard-00000.h5").stat().st_size
    free = 2 * shard + 2**21  # the one missing shard (and HDF5's slack): less than what is already on disk
    assert free < on_disk, (free, on_disk)
    mp.setattr(tcache.outdir, "free_bytes", lambda path: free)
    fd.teacher_rewrite_meets_the_full_disk(case, free)
    return [*args, "--resume"]


# -- faults: bad input (the suite's earlier cases, moved here as rows) -------------------------------------------
def tiny_build(case: Case, *extra, data: Path | str | None = None, tokens: str = "1k") -> list[str]:
    f = case.fixtures
    return ["build", "--teacher", str(f["tiny_teacher"]), "--data", str(data or f["valid_jsonl"]), "--tokens", tokens,
            "--seq-len", "64", "--top-k", "4", "--device", "cpu", "--out", str(case.tmp / "c"), *map(str, extra)]


def with_teacher(teacher):
    def fault(case: Case) -> list[str]:
        args = tiny_build(case)
        args[args.index("--teacher") + 1] = str(teacher(case))
        return args
    return fault


def empty_jsonl(case: Case) -> list[str]:
    case.user("empty.jsonl", "")
    return tiny_build(case, data=case.tmp / "empty.jsonl")


def unreachable_hub(case: Case) -> list[str]:
    """No network and no HF_HUB_OFFLINE: one probe of the hub (no ~27 s of retries), then 'offline?'."""
    import socket

    from tcache import hf

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    mp = case.fixtures["monkeypatch"]
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    mp.setattr(socket, "create_connection", no_network)
    hf.hub_unreachable.cache_clear()
    case.fixtures["finalizers"].append(hf.hub_unreachable.cache_clear)
    return with_teacher(lambda c: "no-such-org/no-such-model")(case)


def a_cache_without_overwrite(case: Case) -> list[str]:
    return build_args(case, copy_of(case, "cache"))


def edited_manifest(case: Case) -> list[str]:
    from tcache.teachercache import schema

    out = copy_of(case, "shared_cache")
    m = json.loads((out / "manifest.json").read_text())
    m["schema_version"] = schema.SCHEMA_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(m))
    return ["stats", str(out)]


def truncated_shard(case: Case) -> list[str]:
    out = copy_of(case, "shared_cache")
    shard = out / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[:1000])
    return ["stats", str(out)]


def distill_out(where: str):
    def fault(case: Case) -> list[str]:
        cache = case.fixtures["cache"]
        out = {"cache": cache, "inside": cache / "sub", "around": cache.parent}[where]
        return distill_args(case, out, "--overwrite")
    return fault


def nothing_written(case: Case) -> None:
    assert not (case.tmp / "c").exists()


def fixture_cache_intact(case: Case) -> None:
    from tcache.teachercache.verify import verify_cache

    assert verify_cache(case.fixtures["cache"])["ok"]


BAD_INPUT = [
    Promise("teacher-path-not-found", with_teacher(lambda c: c.tmp / "nope"), 1, r"--teacher .*no such directory",
            after=nothing_written),
    Promise("teacher-hub-id-not-found", with_teacher(lambda c: "no-such-org/no-such-model"), 1, r"--teacher.*not found",
            after=nothing_written),
    Promise("an-unreachable-hub-is-said-at-once", unreachable_hub, 1,
            r"--teacher no-such-org/no-such-model: not found in the local HF cache.*is unreachable \(offline\?\)",
            timeout=10),
    Promise("dataset-file-not-found", lambda c: tiny_build(c, data=c.tmp / "missing.jsonl"), 1, r"--data.*no such file",
            after=nothing_written),
    Promise("dataset-hub-id-not-found", lambda c: tiny_build(c, data="no-such-org/no-such-dataset"), 1,
            r"--data.*not found", after=nothing_written),
    Promise("dataset-empty", empty_jsonl, 1, r"--data.*empty", after=nothing_written),
    Promise("text-field-missing", lambda c: tiny_build(c, "--text-field", "body"), 1, r"--text-field.*'body'.*columns: text",
            after=nothing_written),
    Promise("top-k-0", lambda c: tiny_build(c, "--top-k", 0), 1, r"--top-k must be at least 1", after=nothing_written),
    Promise("top-k-beyond-the-vocabulary", lambda c: tiny_build(c, "--top-k", 16385), 1, r"--top-k 16385 exceeds",
            after=nothing_written),
    Promise("plan-refuses-what-build-refuses", lambda c: ["plan", *tiny_build(c, "--top-k", 20000)[1:]], 1,
            r"--top-k 20000 exceeds"),
    Promise("seq-len-beyond-max-positions", lambda c: tiny_build(c, "--seq-len", 512), 1,
            r"--seq-len 512.*max_position_embeddings 256"),
    Promise("tokens-less-than-one-row", lambda c: tiny_build(c, tokens="10"), 1, r"--tokens 10.*--seq-len 64"),
    Promise("a-cache-is-replaced-only-with-overwrite", a_cache_without_overwrite, 1,
            r"--out \S+cache is a tcache cache; pass --overwrite to replace it"),
    Promise("stats-of-a-folder-that-is-not-a-cache", lambda c: ["stats", str(c.tmp)], 1, r"not a tcache cache.*tcache build"),
    Promise("stats-of-a-missing-folder", lambda c: ["stats", str(c.tmp / "missing")], 1, r"not a directory"),
    Promise("stats-of-another-schema-version", edited_manifest, 1, r"schema version \d+.*rebuild"),
    Promise("stats-of-a-truncated-shard", truncated_shard, 1, r"shard-00001\.h5.*rebuild"),
    Promise("distill-out-is-the-input-cache", distill_out("cache"), 1, r"inside the input cache", after=fixture_cache_intact),
    Promise("distill-out-inside-the-input-cache", distill_out("inside"), 1, r"inside the input cache",
            after=fixture_cache_intact),
    Promise("distill-out-around-the-input-cache", distill_out("around"), 1, r"contains the input cache",
            after=fixture_cache_intact),
]


# -- config files, full disks, plot targets, data and eval inputs (issue 21: 5, 7, 8, 9, 11, 12) --------------
NOT_INT = r"is not a valid integer; fix the value$"
NOT_OURS = r"exists and was not written by tcache; choose another {} or move it away$"
EVAL_FIX = r"pass a student \(the --out of tcache distill\) or a HF model"

INPUTS = [
    Promise("5.1-config-float-for-an-int", fi.float_for_int, 1, r"c\.yaml: top_k: '12\.7' " + NOT_INT,
            after=fi.nothing_built),
    Promise("5.2-config-key-named-as-spelled", fi.float_for_int_as_flag, 1, r"c\.yaml: top-k: '12\.7' " + NOT_INT,
            after=fi.nothing_built),
    Promise("5.3-config-boolean-for-an-int", fi.bool_for_int, 1, r"c\.yaml: shard-rows: 'True' " + NOT_INT,
            after=fi.nothing_built),
    Promise("5.4-config-not-one-of-the-choices", fi.not_a_choice, 1,
            r"c\.yaml: hidden_dtype: 'fp7' is not one of 'nf4', .*; fix the value$", after=fi.nothing_built),
    Promise("5.5-config-number-for-a-flag", fi.number_for_flag, 1, r"c\.yaml: overwrite: 1 is not a boolean; "
            r"write true or false$", after=fi.nothing_built),
    Promise("5.6-config-text-for-a-float", fi.text_for_float, 1, r"d\.yaml: lr: 'fast' is not a valid float; fix the value$"),
    Promise("7.1-config-yaml-meets-a-full-disk", fi.config_yaml_disk_full, 1,
            r"c/config\.yaml: the disk is full; free space, then rerun", after=fi.no_partial),
    Promise("8.1-plot-out-in-a-directory-without-write-permission", fi.plot_into_locked_dir, 1,
            r"--out \S+curves\.png is not writable \(\S+locked: Permission denied\)"),
    Promise("8.2-stats-plot-in-a-directory-without-write-permission", fi.stats_plot_into_locked_dir, 1,
            r"--plot \S+cache\.png is not writable \(\S+locked: Permission denied\)"),
    Promise("8.3-plot-out-on-a-read-only-mount", fi.plot_into_read_only_mount, 1,
            r"--out \S+curves\.png is not writable \(\S+ro: Read-only file system\)", needs_root=True),
    Promise("8.4-stats-plot-on-a-read-only-mount", fi.stats_plot_into_read_only_mount, 1,
            r"--plot \S+cache\.png is not writable \(\S+ro: Read-only file system\)", needs_root=True),
    Promise("8.5-plot-of-a-run-on-a-read-only-mount", fi.plot_a_read_only_run, 1,
            r"--out \S+ro/run is not writable \(\S+run: Read-only file system\)",
            needs_root=True),
    Promise("9.1-plot-metrics-not-utf8", fi.metrics_not_utf8, 1,
            r"run/metrics\.jsonl line 3 is not UTF-8 \(byte 0xe9 at column 25\); "),
    Promise("9.2-plot-out-is-a-users-png", fi.plot_over_a_users_png, 1, r"--out \S+holiday\.png " + NOT_OURS.format("--out")),
    Promise("9.3-plot-out-is-a-users-file", fi.plot_over_a_users_text, 1, r"--out \S+notes\.png " + NOT_OURS.format("--out")),
    Promise("9.4-stats-plot-is-a-users-png", fi.stats_plot_over_a_users_png, 1,
            r"--plot \S+holiday\.png " + NOT_OURS.format("--plot")),
    Promise("9.5-plot-replaces-a-png-tcache-drew", fi.plot_over_its_own_png, 0, r"^wrote \S+curves\.png$",
            after=fi.both_signed),
    Promise("9.6-stats-plot-replaces-a-png-tcache-drew", fi.stats_plot_over_its_own_png, 0, r"^plot written: ",
            after=fi.stats_png_signed),
    Promise("9.7-plot-of-a-run-redraws-its-training-png", fi.plot_run_default_target, 0, r"^wrote \S+run/training\.png$",
            after=fi.default_target_signed),
    Promise("11.1-jsonl-text-is-an-int", fi.text_is_int, 1,
            r'--data \S+d\.jsonl: line 2: "text" is an int, not a string; fix the data or pass --text-field$',
            after=fi.nothing_built),
    Promise("11.2-jsonl-text-is-null", fi.text_is_null, 1,
            r'--data \S+d\.jsonl: line 1: "text" is null, not a string; fix the data or pass --text-field$',
            after=fi.nothing_built),
    Promise("11.3-jsonl-text-is-missing", fi.text_is_missing, 1,
            r'--data \S+d\.jsonl: line 2: "text" is missing, not a string; fix the data or pass --text-field$',
            after=fi.nothing_built),
    Promise("11.4-eval-jsonl-text-is-a-list", fi.eval_text_is_list, 1,
            r'--data \S+d\.jsonl: line 3: "text" is a list, not a string; fix the data or pass --text-field$'),
    Promise("12.1-eval-of-a-cache", fi.eval_a_cache, 1, r"\S+shared is a tcache cache, not a model; " + EVAL_FIX),
    Promise("12.2-eval-of-a-random-directory", fi.eval_a_random_dir, 1,
            r"^\S+stuff: neither a tcache student nor a HF model \(no student\.json or config\.json\); " + EVAL_FIX),
    Promise("12.3-eval-of-a-missing-directory", fi.eval_a_missing_dir, 1,
            r"^\S+no/such: no such directory; " + EVAL_FIX),
    Promise("12.4-eval-of-a-missing-hub-id", fi.eval_a_missing_hub_id, 1,
            r"^no-such-org/no-such-model: not found in the local HF cache and .*; pass a local model directory, "
            r"or connect and retry$"),
]


# -- generate (issue 21: 10) ---------------------------------------------------------------------------------
# What a stop line says once tokens came: `Stopped by SIGINT; 37 tokens generated.`
AFTER_TOKENS = r"; [1-9]\d* tokens? generated\.$"

GENERATE = [
    Interrupt(
        id="21.10-generate-sigint-streams-then-stops-with-the-text",
        fault=lambda case: fg.generate(case, "run", "--max-new-tokens", "100000"),
        code=130, message=r"^Stopped by SIGINT" + AFTER_TOKENS, signum=signal.SIGINT,
        when=r"^Hi\S*\s+\S+\s+\S",  # the prompt and a few streamed words, while it still runs
        stdout=r"Hi.+\n"),
    Interrupt(
        id="21.10-generate-sigterm-on-an-export-streams-then-stops-with-the-text",
        fault=lambda case: fg.generate(case, "export", "--max-new-tokens", "100000", "--temperature", "0.8"),
        code=143, message=r"^Stopped by SIGTERM" + AFTER_TOKENS, signum=signal.SIGTERM,
        when=r"^Hi\S*\s+\S+\s+\S", stdout=r"Hi.+\n"),
    Interrupt(
        id="21.10-generate-sigint-during-the-prompts-prefill",
        # ~4,500 tokens of prompt: the prefill takes seconds on CPU; the prompt is echoed before it starts
        fault=lambda case: fg.generate(case, "run", "--max-new-tokens", "100000", prompt=fg.long_prompt(case)),
        code=130, message=r"^Stopped by SIGINT; during the prompt's prefill, no tokens generated\.$",
        signum=signal.SIGINT,
        when=lambda case: re.escape(fg.long_prompt(case)) + r"\Z",  # the whole prompt echoed, nothing after it yet
        stdout=lambda case: re.escape(fg.long_prompt(case)) + r"\n"),  # and nothing after it but the line's end
    Promise(
        id="21.10-generate-max-new-tokens-over-the-bound-is-refused",
        # refused before the model loads; today's command would generate two million tokens (hours), hence the child
        # process and its timeout
        fault=lambda case: fg.generate(case, "run", "--max-new-tokens", "2000000"),
        code=1, message=r"--max-new-tokens must be 1 to 1,000,000, got 2,000,000", subprocess=True, timeout=30),
    Promise(
        id="21.10-generate-max-new-tokens-zero-is-refused-with-the-range",
        fault=lambda case: fg.generate(case, "run", "--max-new-tokens", "0"),
        code=1, message=r"--max-new-tokens must be 1 to 1,000,000, got 0"),
]


# -- issue 34, nothing trusted that was not checked: a manifest that no longer describes its shards (verify reports
# it; stats and distill refuse it on open, from HDF5 headers alone), a teacher file gone, a compressed --data that is
# truncated or not what its suffix says, and plot names of formats tcache does not write -----------------------------
# verify's one line for a manifest problem; then the line of every command that opens the cache
VERIFY_MANIFEST = r"^manifest\.json and 0 of {} shards failed verification: manifest\.json \({}\); rebuild the cache"
OPEN_LINE = r"^\S+cc: {}; run `tcache verify \S+cc` for the full report, then rebuild the cache$"
ROWS_RAISED = r"rows is 100, its shards hold 8"
SEQ_LEN = r"seq_len is 64, but every field holds rows of 32 tokens \(input_ids row shape \(32,\)\)"
NO_SHARDS = r"shards is missing or empty, but the directory holds shard-00000\.h5, shard-00001\.h5"
TOPK_SHAPE = r"topk_ids has row shape \(16, 8\), but seq_len 32 and top_k 8 make \(32, 8\)"
TRUNCATED = r"truncated after line \d+ \(Compressed file ended before the end-of-stream marker was reached\); " \
            r"re-download or recompress it$"
NOT_AN_IMAGE = r"{} \S+{}: \.txt is not an image format tcache writes; name it \.png, \.jpg, \.pdf or \.svg$"

CACHE_TRUST = [
    Promise("34-build-from-a-teacher-with-a-truncated-weight-file", fc.build_from_a_truncated_teacher, 1,
            r"--teacher \S+teacher: its weight file model\.safetensors is damaged \(.*\); download or copy the "
            r"model again$", after=fi.nothing_built),
    Promise("34.1-verify-of-a-manifest-with-rows-raised", fc.on_damaged_cache("verify", "rows"), 1,
            VERIFY_MANIFEST.format(2, ROWS_RAISED)),
    Promise("34.2-stats-of-a-manifest-with-rows-raised", fc.on_damaged_cache("stats", "rows"), 1,
            OPEN_LINE.format("manifest\\.json: " + ROWS_RAISED)),
    Promise("34.2-distill-of-a-manifest-with-rows-raised", fc.on_damaged_cache("distill", "rows"), 1,
            OPEN_LINE.format("manifest\\.json: " + ROWS_RAISED), after=fc.no_run),
    Promise("34.1-verify-of-a-manifest-with-seq-len-changed", fc.on_damaged_cache("verify", "seq_len"), 1,
            VERIFY_MANIFEST.format(2, SEQ_LEN)),
    Promise("34.2-stats-of-a-manifest-with-seq-len-changed", fc.on_damaged_cache("stats", "seq_len"), 1,
            OPEN_LINE.format("manifest\\.json: " + SEQ_LEN)),
    Promise("34.2-distill-of-a-manifest-with-seq-len-changed", fc.on_damaged_cache("distill", "seq_len"), 1,
            OPEN_LINE.format("manifest\\.json: " + SEQ_LEN), after=fc.no_run),
    Promise("34.1-verify-of-a-manifest-without-its-shards-list", fc.on_damaged_cache("verify", "shards"), 1,
            VERIFY_MANIFEST.format(0, NO_SHARDS + r", rows is 8, its shards hold 0")),
    Promise("34.2-stats-of-a-manifest-without-its-shards-list", fc.on_damaged_cache("stats", "shards"), 1,
            OPEN_LINE.format("manifest\\.json: " + NO_SHARDS)),
    Promise("34.2-stats-of-a-manifest-with-a-topk-row-shape-edited", fc.on_damaged_cache("stats", "topk_ids"), 1,
            OPEN_LINE.format("manifest\\.json: " + TOPK_SHAPE)),
    Promise("34.2-distill-of-a-manifest-with-a-topk-row-shape-edited", fc.on_damaged_cache("distill", "topk_ids"), 1,
            OPEN_LINE.format("manifest\\.json: " + TOPK_SHAPE), after=fc.no_run),
    Promise("34.2-distill-of-a-cache-without-its-teacher-embeddings", fc.on_damaged_cache("distill"), 1,
            OPEN_LINE.format(r"teacher/embeddings\.safetensors is missing \(manifest\.json lists it\)"), after=fc.no_run),
    Promise("34.3-build-from-a-truncated-jsonl-xz", fc.build_from("d.jsonl.xz", "truncated"), 1,
            r"^--data \S+d\.jsonl\.xz: " + TRUNCATED, after=fi.nothing_built),
    Promise("34.3-build-from-a-truncated-jsonl-gz", fc.build_from("d.jsonl.gz", "truncated"), 1,
            r"^--data \S+d\.jsonl\.gz: " + TRUNCATED, after=fi.nothing_built),
    Promise("34.3-build-from-plain-text-named-jsonl-gz", fc.build_from("d.jsonl.gz", "plain"), 1,
            r"^--data \S+d\.jsonl\.gz: not a gzip file \(Not a gzipped file \(b'\{\"'\)\); if it is plain text, name "
            r"it without \.gz, else re-download or recompress it$", after=fi.nothing_built),
    Promise("34.3-eval-on-a-truncated-jsonl-gz", fc.eval_on("d.jsonl.gz", "truncated"), 1,
            r"^--data \S+d\.jsonl\.gz: " + TRUNCATED),
    Promise("34.4-plot-out-named-txt-is-refused", fc.plot_out("curves.txt"), 1,
            NOT_AN_IMAGE.format("--out", r"curves\.txt"), after=fc.nothing_drawn),
    Promise("34.4-stats-plot-named-txt-is-refused", fc.stats_plot("cache.txt"), 1,
            NOT_AN_IMAGE.format("--plot", r"cache\.txt"), after=fc.nothing_drawn),
    Promise("34.4-stats-plot-named-jpg-draws-a-jpeg", fc.stats_plot("cache.jpg"), 0, r"^plot written: ",
            after=fc.drawn_as("cache.jpg", "JPEG")),
    Promise("34.4-plot-out-named-svg-draws-an-svg", fc.plot_out("curves.svg"), 0, r"^wrote \S+curves\.svg$",
            after=fc.drawn_as("curves.svg", "SVG")),
]


# -- the list of promises -----------------------------------------------------------------------------------------
NO_OVERWRITE_HINT = r"^(?!.*--overwrite).*"
# -- every write path meets a full disk or a read-only target in one line (issue 34; faults in faults_disk.py) ----
FULL = r"the disk is full; free space, then rerun$"
DISK_FAULTS = [
    Promise("34-distill-meets-a-full-disk-saving-the-student", fd.distill_into_a_full_disk, 1, r"full/run: " + FULL,
            after=fd.no_student_left, needs_root=True),
    Promise("34-export-meets-a-full-disk-and-keeps-the-earlier-export", fd.export_over_an_export_on_a_full_disk, 1,
            r"full/hf: " + FULL, after=fd.earlier_export_kept_and_no_staging, needs_root=True),
    Promise("34-distill-meets-a-full-disk-at-its-first-checkpoint", fd.distill_checkpoint_onto_a_full_disk, 1,
            r"full/run: " + FULL, after=fd.no_partial_checkpoint, needs_root=True),
    Promise("34-plot-meets-a-full-disk", fd.plot_onto_a_full_disk, 1, r"full/curves.png: " + FULL,
            after=fi.no_partial, needs_root=True),
    Promise("34-plan-out-on-a-read-only-mount", fd.plan_out_on_a_read_only_mount, 1,
            r"--out \S+ro/c: the file system is read-only; choose a writable place, then rerun$", needs_root=True),
]


ROWS = [
    Promise("21.1-build-overwrite-refuses-a-project-folder", lambda c: project_folder(c, "--overwrite"), 1,
            NO_OVERWRITE_HINT + r".*P holds files tcache did not write \(config\.yaml, teacher\); move them away"),
    Promise("21.1-build-refuses-a-project-folder-without-suggesting-overwrite", project_folder, 1,
            NO_OVERWRITE_HINT + r".*P holds files tcache did not write \(config\.yaml, teacher\)"),
    Promise("21.2-distill-overwrite-refuses-a-folder-of-run-like-names", model_folder, 1,
            NO_OVERWRITE_HINT + r"D holds files tcache did not write \(config\.json, metrics\.jsonl, model\.safetensors\)"),
    Promise("21.3-overwrite-replaces-a-marked-cache", lambda c: build_args(c, copy_of(c, "cache"), "--overwrite"), 0,
            r"cache written", after=marker_lists_what_is_there("cache", "cache")),
    Promise("21.3-overwrite-refuses-a-marked-cache-holding-a-user-file", marked_cache_with_a_user_file, 1,
            NO_OVERWRITE_HINT + r"cache holds files tcache did not write \(notes\.txt\)", after=cache_still_verifies),
    Promise("21.3-migration-an-unmarked-0.1.0-cache-is-replaced", legacy_cache, 0, r"cache written",
            after=marker_lists_what_is_there("cache", "cache")),
    Promise("21.3-migration-an-unmarked-0.1.0-cache-with-a-user-file-is-refused", legacy_cache_with_a_user_file, 1,
            r"holds files tcache did not write \(notes\.txt\)", after=cache_still_verifies),
    Promise("21.3-names-without-tcache-content-are-not-a-cache", cache_lookalike, 1,
            NO_OVERWRITE_HINT + r"L holds files tcache did not write \(manifest\.json, shard-00000\.h5\)"),
    Promise("21.3-migration-an-unmarked-0.1.0-run-is-replaced", legacy_run, 0, r"student saved: ",
            after=marker_lists_what_is_there("run", "run")),
    Promise("21.13-export-onto-a-cache-is-refused-in-plain-words", export_into("cache"), 1,
            r"--out \S+cache is a tcache cache, not an export; choose another --out"),
    Promise("21.13-export-onto-a-user-folder-is-refused", export_into("mine"), 1,
            NO_OVERWRITE_HINT + r"mine holds files tcache did not write \(notes\.txt\)"),
    Promise("21.3-a-marker-rewrite-cut-short-does-not-block-overwrite", marker_rewrite_cut_short("cache"), 0,
            r"cache written", after=marker_lists_what_is_there("cache", "cache")),
    Promise("21.3-a-first-claim-cut-short-does-not-block-a-build", marker_rewrite_cut_short("new"), 0,
            r"cache written", after=marker_lists_what_is_there("new", "cache")),
    Promise("21.4-a-second-build-into-a-locked-out-is-refused", build_while_locked, 1,
            r"--out \S+ is in use by pid \d+ \(tcache"),
    Promise("21.4-a-lock-left-by-kill-9-does-not-block", lock_of_a_killed_process, 0, r"cache written"),
    Promise("21.4-distill-into-a-locked-out-is-refused", distill_while_locked, 1, r"is in use by pid \d+"),
    Promise("21.4-export-into-a-locked-out-is-refused", export_while_locked, 1, r"is in use by pid \d+"),
    Promise("21.6-resume-after-a-full-disk-counts-only-what-remains", resume_after_a_full_disk, 0,
            r"resumed after 2 rows"),
    *INPUTS,
    *GENERATE,
    *BAD_INPUT,
    *CACHE_TRUST,
    *DISK_FAULTS,
]


@pytest.mark.parametrize("promise", ROWS, ids=[p.id for p in ROWS])
def test_promise(promise: Promise, fixtures, tmp_path, monkeypatch):
    if promise.needs_root and os.geteuid() != 0:
        pytest.skip("needs root (tmpfs / bind mounts)")
    case = Case(tmp_path, {**fixtures, "monkeypatch": monkeypatch, "finalizers": []})
    before = fingerprint(fixtures)
    try:
        args = promise.fault(case)
        if isinstance(promise, Interrupt):
            out, at_signal, stdout, took = interrupt(args, case, promise)
            assert took < STOP_WITHIN
            assert stdout.startswith(at_signal), "text printed before the signal was taken back"
            assert re.fullmatch(regex(promise.stdout, case), stdout, re.DOTALL), stdout[-500:]
        else:
            out = invoke(args, case, promise.subprocess, promise.timeout)
        assert "Traceback" not in out.output, out.output
        assert out.code == promise.code, out.output
        if promise.code == 0:
            assert any(re.search(promise.message, line) for line in out.output.splitlines()), out.output
        else:  # one line says why: `Error: ...`, or `Stopped by ...` for a signal
            lines = [line for line in out.output.splitlines() if line.startswith(("Error:", "Stopped by"))]
            assert len(lines) == 1, out.output
            assert re.search(promise.message, lines[0].removeprefix("Error: ")), lines[0]
        case.check_owned()
        if promise.after is not None:
            promise.after(case)
        assert fingerprint(fixtures) == before, "a row changed a shared fixture output"
    finally:
        monkeypatch.undo()
        for fin in case.fixtures["finalizers"]:
            fin()


def test_two_concurrent_builds_into_one_out_exactly_one_wins(tmp_path, teacher_dir, valid_jsonl):
    """Two real builds at once (top-k 64 and top-k 8) into one --out: the second, started while the first holds the
    lock, is refused in one line naming the first's pid; the first's cache is the one on disk, and it verifies."""
    from tcache.teachercache.manifest import load_manifest
    from tcache.teachercache.verify import verify_cache

    text = text_head(valid_jsonl, tmp_path / "t.jsonl", 60000)
    out = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}

    def start(k: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tcache", "build", "--teacher", str(teacher_dir), "--data",
                                 str(text), "--tokens", "8k", "--seq-len", "128", "--top-k", str(k), "--device", "cpu",
                                 "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start(64)
    lock = tmp_path / ".c.tcache-lock"
    t = time.time()
    while not lock.exists():
        assert first.poll() is None and time.time() - t < 60, first.communicate()
        time.sleep(0.02)
    second = start(8)
    err2 = second.communicate(timeout=120)[1]
    err1 = first.communicate(timeout=300)[1]
    assert first.returncode == 0, err1
    assert second.returncode == 1 and "Traceback" not in err2, err2
    errors = [line for line in err2.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"in use by pid {first.pid}" in errors[0], err2
    assert load_manifest(out).top_k == 64 and verify_cache(out)["ok"]
    assert not lock.exists()  # released and removed by its holder


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_tcache_is_starting_is_one_line(tmp_path, sig):
    """Ctrl-C in the first second, while torch and transformers import: one `Stopped by` line and 128 + signal, not
    an import traceback (nor, for SIGTERM, a silent death)."""
    proc = subprocess.Popen([sys.executable, "-m", "tcache", "stats", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    time.sleep(0.5)  # past Python's own start (tcache's handlers are in place), inside the ~1 s of imports
    assert proc.poll() is None, "tcache started faster than the test can signal it"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert err.splitlines() == [f"Stopped by {signal.Signals(sig).name} while tcache was starting; nothing was done."]
