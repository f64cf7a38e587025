"""Cache integrity: `tcache verify`, ShardHasher, and clean errors for corrupt rows read by distill."""

from __future__ import annotations

import json
import re
import shutil

import click
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tcache.cli.errors import friendly_errors
from tcache.cli.main import main
from tcache.student.training.data import CacheRows
from tcache.teachercache import schema
from tcache.teachercache.manifest import load_manifest
from tcache.errors import TcacheError
from tcache.teachercache.reader import CacheReader, ShardHasher, hash_file
from tcache.teachercache.verify import verify_cache
from test_cli_build import assert_clean_error


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def cache(tmp_path, shared_cache):
    """A private copy of the shared 3-shard cache, free to corrupt."""
    out = tmp_path / "c"
    shutil.copytree(shared_cache, out)
    return out


def shard_files(cache) -> list[str]:
    return [s.file for s in load_manifest(cache).shards]


def rewrite(cache, shard: str, edit) -> None:
    """Edit a shard with h5py, then record its new size and sha256 so the hash check passes: what is left
    to catch is the values themselves."""
    with h5py.File(cache / shard, "r+") as f:
        edit(f)
    m = json.loads((cache / schema.MANIFEST_FILE).read_text())
    for s in m["shards"]:
        if s["file"] == shard:
            s["bytes"] = (cache / shard).stat().st_size
            s["sha256"] = hash_file(cache / shard)
    (cache / schema.MANIFEST_FILE).write_text(json.dumps(m))


def bad_files(report) -> list[str]:
    return [x["file"] for x in report["shards"] + report["teacher_files"] if not x["ok"]]


def test_good_cache_verifies(shared_cache):
    r = run("verify", shared_cache)
    assert r.exit_code == 0, r.output
    assert "3 of 3 shards ok" in r.output and "FAILED" not in r.output
    r = run("verify", shared_cache, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and report["shards_total"] == 3 and report["shards_bad"] == 0
    assert report["manifest_problems"] == []
    assert [s["rows"] for s in report["shards"]] == [5, 5, 2] and all(s["ok"] for s in report["shards"])
    assert report["teacher_files_total"] >= 3 and all(t["ok"] for t in report["teacher_files"])
    seen = []
    verify_cache(shared_cache, on_progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    with ShardHasher(shared_cache, load_manifest(shared_cache)) as h:
        h.wait()
        assert h.done and h.checked == 3
        h.check()


def test_a_flipped_byte_names_exactly_that_shard(cache):
    files = shard_files(cache)
    for shard in files:
        path = cache / shard
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x55]))
        r = run("verify", cache)
        assert_clean_error(r, f"1 of {len(files)} shards failed verification", f"{shard} (sha256 mismatch", "rebuild")
        error = next(line for line in r.output.splitlines() if line.startswith("Error:"))
        assert all(other not in error for other in files if other != shard), error
        report = json.loads(run("verify", cache, "--json").output.split("\nError:")[0])
        assert bad_files(report) == [shard] and "sha256 mismatch" in report["shards"][files.index(shard)]["problems"]
        h = ShardHasher(cache, load_manifest(cache))
        with pytest.raises(TcacheError, match=rf"shard {shard} fails its sha256 check.*tcache verify"):
            h.wait()
        assert h.done and h.checked == files.index(shard)
        with open(path, "r+b") as f:  # put it back for the next shard
            f.seek(path.stat().st_size // 2)
            f.write(b)
    assert verify_cache(cache)["ok"]


def test_check_never_blocks_and_close_stops(cache):
    h = ShardHasher(cache, load_manifest(cache))
    h.check()  # whatever has been hashed so far is fine
    h.close()
    assert h.done
    h.check()


@pytest.mark.parametrize("how", ["deleted", "renamed"])
def test_a_missing_shard_is_named(cache, how):
    shard = cache / "shard-00001.h5"
    if how == "deleted":
        shard.unlink()
    else:
        shard.rename(cache / "shard-00001.h5.bak")
    assert_clean_error(run("stats", cache), "shard-00001.h5", "missing", "rebuild")
    r = run("verify", cache)
    assert_clean_error(r, "1 of 3 shards failed verification", "shard-00001.h5 (missing)", "rebuild")
    assert "shard-00000.h5" not in r.output.splitlines()[-1]


def test_a_truncated_shard_is_named_with_what_else_is_wrong(cache):
    shard = cache / "shard-00002.h5"
    shard.write_bytes(shard.read_bytes()[:1000])
    report = verify_cache(cache)
    assert bad_files(report) == ["shard-00002.h5"]
    problems = report["shards"][2]["problems"]
    assert any("manifest says" in p for p in problems) and "sha256 mismatch" in problems
    assert any("HDF5" in p or "unreadable" in p for p in problems), problems


def test_a_changed_teacher_file_is_named(cache):
    with open(cache / "teacher" / "config.json", "a") as f:
        f.write(" ")
    r = run("verify", cache)
    assert_clean_error(r, "0 of 3 shards and 1 of", "teacher/config.json (sha256 mismatch)")


@pytest.mark.parametrize("field", [schema.INPUT_IDS, schema.TOPK_IDS])
def test_ids_out_of_range(cache, field):
    vocab = load_manifest(cache).vocab_size

    def edit(f):
        f[field][3, 7, ...] = vocab  # shard-00001.h5 row 3 = cache row 8

    rewrite(cache, "shard-00001.h5", edit)
    report = verify_cache(cache)
    assert bad_files(report) == ["shard-00001.h5"]
    assert any("ids out of range" in p and field in p and "row 3" in p for p in report["shards"][1]["problems"])
    r = run("verify", cache)
    assert_clean_error(r, "shard-00001.h5 (ids out of range")

    rows = CacheRows(str(cache))
    rows[7], rows[9]  # neighbours are fine
    with pytest.raises(TcacheError, match=rf"shard shard-00001.h5 row 3 has {field} outside \[0, {vocab}\).*tcache verify"):
        rows[8]


def test_a_worker_error_reaches_the_cli_as_one_line(cache):
    """A DataLoader worker re-raises TcacheError wrapped with the worker's traceback; the CLI shows its line."""
    rewrite(cache, "shard-00000.h5", lambda f: f[schema.TOPK_IDS].__setitem__((0, 0, 0), 65535))
    batches = iter(torch.utils.data.DataLoader(CacheRows(str(cache)), batch_size=1, num_workers=1))
    with pytest.raises(TcacheError) as caught:
        next(batches)
    wrapped = str(caught.value)
    batches._shutdown_workers()  # a worker left to garbage collection costs a 5 s join timeout
    assert "Original Traceback" in wrapped  # what torch makes of it

    @click.command()
    @friendly_errors
    def cmd():
        raise TcacheError(wrapped)

    r = CliRunner().invoke(cmd, [])
    assert_clean_error(r, "shard shard-00000.h5 row 0 has topk_ids outside [0, 16384)", "tcache verify")
    error = r.output.strip().splitlines()
    assert len(error) == 1 and "DataLoader" not in error[0], r.output


def test_friendly_errors_keeps_plain_messages():
    @click.command()
    @friendly_errors
    def cmd():
        raise TcacheError("--lr must be positive, got 0")

    r = CliRunner().invoke(cmd, [])
    assert r.output.strip() == "Error: --lr must be positive, got 0"


def test_an_unreadable_shard_is_named_by_the_reader(cache):
    """Damaged after the cache was opened (the reader opens shards lazily): named when a row of it is read;
    damaged before: named when the cache is opened (load_manifest's header check), before any row is read."""
    with CacheReader(cache) as r:
        r.row(0)
        (cache / "shard-00002.h5").write_bytes(b"\0" * (cache / "shard-00002.h5").stat().st_size)  # same size
        with pytest.raises(TcacheError, match=r"shard shard-00002.h5 cannot be read.*tcache verify"):
            r.row(10)
    with pytest.raises(TcacheError, match=r"shard shard-00002.h5: does not open as HDF5.*tcache verify"):
        CacheRows(str(cache))


@pytest.mark.parametrize("damage, problem", [
    ("positive", "topk_logprobs positive"),
    ("unsorted", "topk_logprobs not sorted"),
    ("nan", "topk_logprobs not finite"),
    ("scale", "hidden_scale not finite or negative"),
])
def test_bad_values_are_reported(cache, damage, problem):
    def edit(f):
        lp = f[schema.TOPK_LOGPROBS]
        if damage == "positive":
            lp[1, 5, 0] = 0.5
        elif damage == "unsorted":
            row = lp[1, 5]
            lp[1, 5] = row[::-1]
        elif damage == "nan":
            lp[1, 5, 3] = np.nan
        else:
            f[schema.HIDDEN_SCALE][1, 5, 0] = -1.0

    rewrite(cache, "shard-00000.h5", edit)
    report = verify_cache(cache)
    assert bad_files(report) == ["shard-00000.h5"]
    assert any(p.startswith(problem) and "row 1" in p for p in report["shards"][0]["problems"]), report["shards"][0]
    assert_clean_error(run("verify", cache), f"shard-00000.h5 ({problem}")


def test_a_manifest_that_does_not_load_is_the_usual_error(tmp_path, cache):
    assert_clean_error(run("verify", tmp_path / "nope"), "not a directory")
    m = json.loads((cache / schema.MANIFEST_FILE).read_text())
    m["schema_version"] = 99
    (cache / schema.MANIFEST_FILE).write_text(json.dumps(m))
    assert_clean_error(run("verify", cache), "schema version 99", "rebuild")


def test_a_wrong_dataset_shape_or_dtype_is_reported(cache):
    def edit(f):
        del f[schema.TOPK_IDS]
        f.create_dataset(schema.TOPK_IDS, data=np.zeros((5, 128, 32), np.int32))

    rewrite(cache, "shard-00000.h5", edit)
    report = verify_cache(cache)
    assert report["shards"][0]["problems"] == ["topk_ids stored as int32, manifest says uint16"]


def test_distill_on_out_of_range_ids_is_one_clean_line(tmp_path, cache):
    """What a user sees: before, a raw IndexError from the embedding (a device-side assert on a GPU)."""
    for shard in shard_files(cache):
        rewrite(cache, shard, lambda f: f[schema.INPUT_IDS].__setitem__((slice(None), 0), 20000))
    r = run("distill", cache, "--out", tmp_path / "s", "--steps", 2, "--batch-size", 2, "--grad-accum", 1,
            "--workers", 1, "--device", "cpu")
    assert_clean_error(r, "has input_ids outside [0, 16384)", "tcache verify")


# -- the manifest against the shards it describes (issue 34) -------------------------------------------------------
def edit_manifest(cache, edit) -> None:
    m = json.loads((cache / schema.MANIFEST_FILE).read_text())
    edit(m)
    (cache / schema.MANIFEST_FILE).write_text(json.dumps(m))


# edit of the shared cache's manifest (12 rows of 128 tokens in shards of 5, 5 and 2, top-k 32) -> the problem
MANIFEST_EDITS = {
    "rows": (lambda m: m.update(rows=15), "rows is 15, its shards hold 12"),
    "seq_len": (lambda m: m.update(seq_len=256),
                "seq_len is 256, but every field holds rows of 128 tokens (input_ids row shape (128,))"),
    "shards-deleted": (lambda m: m.pop("shards"),
                       "shards is missing or empty, but the directory holds shard-00000.h5, shard-00001.h5, "
                       "shard-00002.h5"),
    "shards-one-dropped": (lambda m: m.update(shards=m["shards"][:2], rows=10),
                           "shards does not list shard-00002.h5, in the cache beside it"),
    "topk-row-shape": (lambda m: m["fields"][schema.TOPK_IDS].update(row_shape=[64, 32]),
                       "topk_ids has row shape (64, 32), but seq_len 128 and top_k 32 make (128, 32)"),
    "field-dropped": (lambda m: m["fields"].pop(schema.TOPK_LOGPROBS), "fields has no topk_logprobs"),
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_a_manifest_that_disagrees_with_its_shards_fails_verify_and_every_open(cache, edit):
    """Each edit used to pass verify (or say "0 of 0 shards ok", exit 0) and end in a traceback or a silent run
    of whatever opened the cache; now verify fails naming the field, and load_manifest refuses in one line."""
    change, problem = MANIFEST_EDITS[edit]
    edit_manifest(cache, change)
    report = verify_cache(cache)
    assert not report["ok"] and problem in report["manifest_problems"], report["manifest_problems"]
    assert_clean_error(run("verify", cache), "manifest.json and", problem, "rebuild the cache")
    with pytest.raises(TcacheError, match=rf"manifest\.json: {re.escape(problem)}.*tcache verify"):
        load_manifest(cache)


def test_a_shards_rows_edited_is_named_from_its_header(cache):
    """A shard's rows edited with the total to match: only the HDF5 header (5 rows stored) can tell."""
    edit_manifest(cache, lambda m: (m["shards"][0].update(rows=4), m.update(rows=11)))
    report = verify_cache(cache)
    assert report["manifest_problems"] == [] and bad_files(report) == ["shard-00000.h5"]
    assert "input_ids has shape (5, 128), manifest says (4, 128)" in report["shards"][0]["problems"]
    with pytest.raises(TcacheError, match=r"shard shard-00000\.h5: input_ids has shape \(5, 128\), manifest says"):
        load_manifest(cache)


def test_a_count_that_is_not_an_integer_is_one_line(cache):
    edit_manifest(cache, lambda m: m.update(seq_len="128"))
    for opened in (load_manifest, verify_cache):
        with pytest.raises(TcacheError, match=r"manifest\.json: seq_len is '128', not a count; run `tcache verify"):
            opened(cache)


@pytest.mark.parametrize("listed", [True, False])
def test_the_teacher_embeddings_missing(cache, listed):
    """Listed in the manifest: every open refuses; not listed either (an edited manifest): verify names it, and
    the student's loader refuses in one line instead of a FileNotFoundError."""
    from tcache.student.models.io import load_teacher_parts

    (cache / schema.EMBEDDINGS_FILE).unlink()
    if not listed:
        edit_manifest(cache, lambda m: m["teacher_files"].pop(schema.EMBEDDINGS_FILE))
    report = verify_cache(cache)
    entry = next(t for t in report["teacher_files"] if t["file"] == schema.EMBEDDINGS_FILE)
    assert not report["ok"] and entry["problems"] == ["missing" if listed else "not listed in manifest.json, and missing"]
    if listed:
        with pytest.raises(TcacheError, match=r"teacher/embeddings\.safetensors is missing \(manifest\.json lists it\)"):
            load_manifest(cache)
    else:
        load_manifest(cache)  # nothing it lists is missing: the loader of the file is the last line of defence
    with pytest.raises(TcacheError, match=r"embeddings\.safetensors is missing.*tcache verify"):
        load_teacher_parts(cache)
