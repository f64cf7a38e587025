"""The build against independent recomputation with transformers; determinism; format invariants."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from independent_check import assert_same_files, check_cache, decode_hidden_values, read_cache
from conftest import build_cache, teacher_fails_at_batch, text_head
from tcache.teachercache import schema
from tcache.teachercache.codecs import decode_hidden
from tcache.teachercache.manifest import load_manifest
from tcache.units import parse_count
from tcache.errors import TcacheError
from tcache.teachercache.reader import CacheReader, hash_file


def test_shared_teacher_cache_matches_transformers(shared_cache, teacher_dir, valid_jsonl):
    worst = check_cache(shared_cache, teacher_dir, valid_jsonl)
    assert worst["rows_checked"] == 12
    # fp16 storage of the hidden mean: relative error of one fp16 rounding (2^-11) and no more
    assert worst["hidden_rel"] < 0.2  # nf4: the widest gap between levels is 0.30 of the block absmax


def test_manifest_describes_the_shards(shared_cache):
    manifest = json.loads((shared_cache / "manifest.json").read_text())
    assert manifest["schema_version"] == schema.SCHEMA_VERSION
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, 2]
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert manifest["tokens"] == 12 * 128 and manifest["rows"] == 12
    assert manifest["vocab_size"] == 16384 and manifest["hidden_size"] == 384 and manifest["num_layers"] == 8
    assert manifest["layer_groups"] == [[0, 8]]
    assert "hidden_states[1:]" in manifest["hidden_source"]
    for rel, digest in manifest["teacher_files"].items():
        assert hash_file(shared_cache / rel) == digest
    assert {"teacher/config.json", "teacher/embeddings.safetensors", "teacher/tokenizer.json"} <= set(
        manifest["teacher_files"])
    assert not list(shared_cache.glob("*.partial"))
    with h5py.File(shared_cache / "shard-00000.h5") as f:
        # the defaults: nf4 hidden (two codes a byte) with an fp16 scale per 32 values, fp16 log-probs, uint16 ids
        assert f["hidden"].shape == (5, 128, 192) and f["hidden"].dtype == np.uint8
        assert f["hidden_scale"].shape == (5, 128, 12) and f["hidden_scale"].dtype == np.float16
        assert f["topk_ids"].dtype == np.uint16 and f["topk_logprobs"].dtype == np.float16
        assert f["hidden"].chunks == (1, 128, 192)


def test_reader_rows_match_raw_h5py(shared_cache):
    _, raw = read_cache(shared_cache)
    with CacheReader(shared_cache) as reader:
        assert len(reader) == 12
        span = reader.rows(3, 11)  # crosses two shard boundaries
        for name in schema.FIELDS:
            np.testing.assert_array_equal(span[name], raw[name][3:11])
            np.testing.assert_array_equal(reader.row(7)[name], raw[name][7])
        reader.verify()
        with pytest.raises(IndexError):
            reader.row(12)


@pytest.mark.parametrize("hidden_dtype,logprob_dtype", [("nf4", "fp16"), ("int8", "fp16"), ("fp16", "fp32"), ("bf16", "fp16")])
def test_every_field_dtype_matches_transformers(tmp_path, tiny_teacher, valid_jsonl, hidden_dtype, logprob_dtype):
    """Every stored value against transformers (check_cache: for int8 also that each position's scale is the
    teacher's absmax / 127 and its largest |q| is 127, so an encoder 4x coarser than absmax / 127 fails), and
    the library's decode_hidden against the independent decoder, every row and value: an nf4 decoder with
    its nibble order swapped (or any decoder off by a bit) fails. Exact equality: the independent decoder's
    float64 products are exact (an int8 or a float32 NF4 level times an fp16 scale), so the library's float32
    result is that value correctly rounded."""
    out = tmp_path / "c"
    m = build_cache(out, tiny_teacher, valid_jsonl, tokens=2 * 64, seq_len=64, top_k=16, hidden_groups=2,
                    hidden_dtype=hidden_dtype, logprob_dtype=logprob_dtype)
    dtype = m.fields["hidden"]["dtype"]
    assert dtype == schema.HIDDEN_DTYPES[hidden_dtype]
    assert check_cache(out, tiny_teacher, valid_jsonl)["rows_checked"] == 2
    with CacheReader(out) as r:  # the library's decoding agrees with the independent decoding of the raw values
        rows = r.rows(0, len(r))
    h = decode_hidden(rows, dtype)
    assert h.shape == (2, 64, 2, 32) and h.dtype == np.float32
    want = decode_hidden_values(rows, dtype)  # (2, 64, 2, 32) float64, exact
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(h, want.astype(np.float32))


OLD_CACHES = Path(__file__).parent / "data"


@pytest.mark.parametrize("version", [1, 2])
def test_version_1_caches_stay_readable(version):
    """Real caches written by the code of old commits (tests/data/cache-v1: 9fdbd26, the last of schema
    version 1: fp16 hidden, fp32 log-probs, no safetensors metadata; tests/data/cache-v2: c9de9f0 = 9132b78^,
    the last before the bump to version 3: int8 hidden with a scale, fp16 log-probs, 2 layer groups; both
    README.md say how), over a stored tiny teacher. Rows are read and checked against values derived without
    tcache: the input ids are the stored text tokenised by the cache's own tokenizer, every cached log-prob
    and hidden value is transformers' on the stored teacher (check_cache), the log-probs are log-probabilities
    whose mass is at most 1; the library's reader and decoder agree with raw h5py and the independent
    decoder; `tcache stats` and `tcache verify` run on them. Catches a reader that accepts an old version
    number but no longer reads or decodes the old layout (what rewriting a new cache's version number hid)."""
    from transformers import AutoTokenizer

    from independent_check import packed_reference
    from test_cli_build import run

    fixture = OLD_CACHES / "cache-v1"  # the teacher and text that both old caches were built from
    teacher, text, cache = fixture / "teacher", fixture / "data.jsonl", OLD_CACHES / f"cache-v{version}" / "cache"
    m = load_manifest(cache)
    assert m.schema_version == version and m.rows == 2 and m.seq_len == 16 and m.top_k == 4
    worst = check_cache(cache, teacher, text)
    assert worst["rows_checked"] == 2 and worst["id_mismatch_untied"] == 0

    _, raw = read_cache(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache / "teacher")  # the copy inside the old cache
    np.testing.assert_array_equal(raw["input_ids"].astype(np.int64), packed_reference(text, tokenizer, 16, 2))
    lp = raw["topk_logprobs"].astype(np.float64)  # (2, 16, 4)
    assert np.all(lp <= 1e-3) and np.all(np.diff(lp, axis=-1) <= 0)
    mass = np.exp(lp).sum(-1)
    assert np.all(mass <= 1 + 1e-3) and np.all(mass > 0)

    dtype = m.fields["hidden"]["dtype"]
    assert dtype == {1: "float16", 2: "int8"}[version]
    with CacheReader(cache) as reader:
        assert len(reader) == 2
        rows = reader.rows(0, 2)
        for name in raw:
            np.testing.assert_array_equal(rows[name], raw[name])
        reader.verify()
    np.testing.assert_array_equal(decode_hidden(rows, dtype), decode_hidden_values(raw, dtype).astype(np.float32))

    from tcache.student.models.io import load_teacher_parts  # what distill reads of an old cache's teacher/ copy

    parts = load_teacher_parts(cache)
    lm = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    assert torch.equal(parts["embed_tokens"], lm.get_input_embeddings().weight)
    assert torch.equal(parts["lm_head"], lm.get_output_embeddings().weight)
    assert torch.equal(parts["final_norm"], lm.model.norm.weight)

    r = run("stats", cache, "--json")
    assert r.exit_code == 0, r.output
    stats = json.loads(r.output)
    assert stats["schema_version"] == version and stats["rows"] == 2 and stats["tokens"] == 32
    assert stats["topk_mass"]["mean"] == pytest.approx(mass.mean(), rel=1e-6)
    r = run("verify", cache, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["ok"] and report["rows"] == 2 and report["shards_total"] == 1 and report["teacher_files_total"] == 4


def test_groups_and_full_vocab_on_tiny_teacher(tmp_path, tiny_teacher, valid_jsonl):
    """G=2 hidden groups (each its own mean) and k = V: the cached top-k then carries all the mass."""
    out = tmp_path / "c"
    m = build_cache(out, tiny_teacher, valid_jsonl, tokens=3 * 64, seq_len=64, top_k=16384,
                    hidden_groups=2, batch_size=2, logprob_dtype="fp32")
    assert m.layer_groups == [(0, 2), (2, 4)]
    worst = check_cache(out, tiny_teacher, valid_jsonl)
    assert worst["rows_checked"] == 3
    _, raw = read_cache(out)
    assert raw["hidden"].shape == (3, 64, 2, 16)  # nf4: D = 32 values in 16 bytes per position and group
    mass = np.exp(raw["topk_logprobs"].astype(np.float64)).sum(-1)  # (rows, T)
    np.testing.assert_allclose(mass, 1.0, atol=1e-4)
    # the untied head is stored as the head, not as a copy of the embedding
    from safetensors.numpy import load_file
    emb = load_file(str(out / schema.EMBEDDINGS_FILE))
    assert not np.allclose(emb["embed_tokens"], emb["lm_head"])


def test_a_tied_head_is_stored_once_in_the_checkpoint_dtype(shared_cache, teacher_dir):
    """The shared teacher (fp16 checkpoint, tied head): embeddings.safetensors holds one fp16 (V, D) matrix,
    flagged tied, and the students get it in fp32 under both names, equal to transformers' own weights."""
    from safetensors import safe_open

    from tcache.student.models.io import load_teacher_parts

    with safe_open(str(shared_cache / schema.EMBEDDINGS_FILE), "pt") as f:
        assert f.metadata()[schema.TIED_HEAD_KEY] == "true" and "lm_head" not in f.keys()
        assert f.get_tensor("embed_tokens").dtype == torch.float16
    parts = load_teacher_parts(shared_cache)
    lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    assert parts["lm_head"].dtype == torch.float32
    assert torch.equal(parts["embed_tokens"], lm.get_input_embeddings().weight)
    assert torch.equal(parts["lm_head"], lm.get_output_embeddings().weight)


def test_same_command_gives_identical_shards(tmp_path, tiny_teacher, valid_jsonl):
    """Also across tokenisation modes: in the build's thread (a) or in worker processes (b)."""
    kw = dict(tokens=6 * 64, seq_len=64, top_k=8, batch_size=4, rows_per_shard=4)
    a = build_cache(tmp_path / "a", tiny_teacher, valid_jsonl, tokenizer_workers=0, **kw)
    b = build_cache(tmp_path / "b", tiny_teacher, valid_jsonl, tokenizer_workers=2, **kw)
    assert a.build["tokenizer_workers"] == 0 and b.build["tokenizer_workers"] == 2
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a.teacher_files == b.teacher_files
    for s in a.shards:
        assert (tmp_path / "a" / s.file).read_bytes() == (tmp_path / "b" / s.file).read_bytes()


FAILED_KW = dict(tokens=8 * 64, seq_len=64, top_k=4, batch_size=2, rows_per_shard=2)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, valid_jsonl):
    """The heads of three held-out books: a build over all of valid.jsonl tokenises ~1M characters first."""
    return text_head(valid_jsonl, tmp_path_factory.mktemp("text") / "small.jsonl", 20_000)


@pytest.fixture(scope="module")
def failed_build(tmp_path_factory, tiny_teacher, small_text):
    """A build whose third teacher batch raised: (its directory, the exception). Tests copy the directory."""
    out = tmp_path_factory.mktemp("failed") / "c"
    with pytest.MonkeyPatch.context() as mp:
        teacher_fails_at_batch(mp)
        with pytest.raises(RuntimeError) as err:
            build_cache(out, tiny_teacher, small_text, **FAILED_KW)
    return out, err.value


def test_failed_build_leaves_resumable_state_and_no_cache(tmp_path, failed_build, tiny_teacher, small_text):
    """An error mid-build keeps the complete shards and the build state, never a manifest; --resume then
    finishes a cache whose shard and teacher files are byte for byte an uninterrupted build's (rehashed from
    the files: a resume that adopted the kept shards' recorded digests but whose shard 0 had a byte flipped
    right after its adoption matched the manifests' digests and fails here)."""
    import shutil

    out = tmp_path / "c"
    shutil.copytree(failed_build[0], out)
    assert failed_build[1].resumable
    assert not (out / schema.MANIFEST_FILE).exists() and (out / "build-state.json").exists()
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.h5", "shard-00001.h5"]
    with pytest.raises(TcacheError, match="no manifest.json"):
        load_manifest(out)
    resumed = build_cache(out, tiny_teacher, small_text, resume=True, **FAILED_KW)
    full = build_cache(tmp_path / "full", tiny_teacher, small_text, **FAILED_KW)
    assert resumed.build["resumed_at_row"] == 4 and not (out / "build-state.json").exists()
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in full.shards]
    assert_same_files(out, tmp_path / "full")


def test_resume_refuses_a_kept_shard_whose_bytes_changed(tmp_path, failed_build, tiny_teacher, small_text):
    """One byte of a kept shard flipped between the interruption and --resume (same size, so the size check
    passes): the resume rehashes what it adopts and refuses, in one line naming the shard and the fix, instead
    of finishing a cache whose manifest vouches for the old bytes. Catches a --resume that adopts kept shards by
    size and copies their recorded digests (what _adopt_complete_shards did). A kept shard whose hash the stop
    came before (sha256 "" in the state) is hashed then and its digest recorded."""
    import shutil

    from test_cli_build import assert_clean_error, run

    out = tmp_path / "c"
    shutil.copytree(failed_build[0], out)
    state = json.loads((out / "build-state.json").read_text())
    assert [bool(s["sha256"]) for s in state["shards"]] == [True, True]  # both hashed before the failure
    shard = out / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(TcacheError) as err:
        build_cache(out, tiny_teacher, small_text, resume=True, **FAILED_KW)
    msg = str(err.value)
    assert "\n" not in msg and "shard-00000.h5" in msg and "sha256" in msg and "--overwrite" in msg, msg
    # the same through the CLI: one `Error:` line, no traceback
    r = run("build", "--teacher", tiny_teacher, "--data", small_text, "--tokens", 8 * 64, "--seq-len", 64,
            "--top-k", 4, "--batch-size", 2, "--shard-rows", 2, "--device", "cpu", "--out", out, "--resume")
    assert_clean_error(r, "--resume", "shard-00000.h5", "sha256", "--overwrite")
    assert not (out / schema.MANIFEST_FILE).exists() and shard.read_bytes() == bytes(data)  # nothing adopted

    # an unhashed kept shard: hashed at the resume, and the manifest records the digest of its bytes
    out2 = tmp_path / "c2"
    shutil.copytree(failed_build[0], out2)
    state["shards"][1]["sha256"] = ""
    (out2 / "build-state.json").write_text(json.dumps(state))
    m = build_cache(out2, tiny_teacher, small_text, resume=True, **FAILED_KW)
    digest = hashlib.sha256((out2 / "shard-00001.h5").read_bytes()).hexdigest()
    assert m.shards[1].sha256 == digest == json.loads((failed_build[0] / "build-state.json").read_text())[
        "shards"][1]["sha256"]


def test_hooked_teacher_pass_equals_hidden_states_reference(tiny_teacher):
    """The build's hook-based running means equal the output_hidden_states reference implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    from tcache.teachercache.teacher import TeacherPass, teacher_targets

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    ids = torch.randint(0, 16384, (3, 40))
    for groups in ([(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]):
        ref = teacher_targets(model, ids, groups, 8)
        tp = TeacherPass(model, groups, 8)
        got = tp(ids)
        assert tp.hooked
        torch.testing.assert_close(got.hidden, ref.hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.topk_logprobs, ref.topk_logprobs)
        assert torch.equal(got.topk_ids, ref.topk_ids)
        tp.close()


@pytest.mark.parametrize("text,value", [("512M", 512_000_000), ("2.5k", 2500), ("100000", 100000),
                                        ("1B", 10**9), ("1_000", 1000), (77, 77)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12x", "-5", "0"])
def test_parse_count_rejects(text):
    with pytest.raises(TcacheError, match="--tokens"):
        parse_count(text)


def test_layer_groups():
    assert schema.layer_groups(8, 1) == [(0, 8)]
    assert schema.layer_groups(8, 8) == [(i, i + 1) for i in range(8)]
    assert schema.layer_groups(32, 5) == [(0, 7), (7, 14), (14, 20), (20, 26), (26, 32)]
    with pytest.raises(TcacheError, match="--hidden-groups"):
        schema.layer_groups(8, 9)


def test_kd_only_cache_without_hidden_states(tmp_path, tiny_teacher, valid_jsonl):
    out = tmp_path / "c"
    m = build_cache(out, tiny_teacher, valid_jsonl, tokens=2 * 64, seq_len=64, top_k=8, hidden_groups=0)
    assert "hidden" not in m.fields and m.layer_groups == []
    with h5py.File(out / "shard-00000.h5") as f:
        assert set(f) == {"input_ids", "topk_logprobs", "topk_ids"}
    assert check_cache(out, tiny_teacher, valid_jsonl)["rows_checked"] == 2


def test_tokenizer_pool_packs_the_same_rows_as_transformers(teacher_dir, valid_jsonl):
    """Many small tasks in flight across two processes still come back in document order, and the rows
    equal the documented packing computed with transformers' own tokenizer call."""
    import itertools

    from independent_check import packed_reference
    from transformers import AutoTokenizer

    from tcache.text import DataSpec, TokenizerPool, iter_texts, pack_rows

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    pool = TokenizerPool(tok, 2, chars_per_task=3000, max_docs=2)
    try:
        got = np.stack(list(itertools.islice(
            pack_rows(iter_texts(DataSpec(str(valid_jsonl))), tok, 128, tok.eos_token_id, pool=pool), 200)))
    finally:
        pool.close()
    np.testing.assert_array_equal(got, packed_reference(valid_jsonl, tok, 128, 200))
