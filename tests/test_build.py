"""The build against independent recomputation with transformers; determinism; format invariants."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from independent_check import check_cache, read_cache
from conftest import build_cache
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
    out = tmp_path / "c"
    m = build_cache(out, tiny_teacher, valid_jsonl, tokens=2 * 64, seq_len=64, top_k=16, hidden_groups=2,
                    hidden_dtype=hidden_dtype, logprob_dtype=logprob_dtype)
    assert m.fields["hidden"]["dtype"] == schema.HIDDEN_DTYPES[hidden_dtype]
    assert check_cache(out, tiny_teacher, valid_jsonl)["rows_checked"] == 2
    with CacheReader(out) as r:  # the library's decoding agrees with the raw values
        row = r.row(1)
        h = decode_hidden(row, m.fields["hidden"]["dtype"])
    assert h.shape == (64, 2, 32) and h.dtype == np.float32


def test_version_1_caches_stay_readable(tmp_path, tiny_teacher, valid_jsonl):
    out = tmp_path / "c"
    build_cache(out, tiny_teacher, valid_jsonl, tokens=64, seq_len=64, top_k=4, hidden_dtype="fp16",
                logprob_dtype="fp32")  # exactly the version-1 layout
    m = json.loads((out / "manifest.json").read_text())
    m["schema_version"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    assert load_manifest(out).schema_version == 1


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

    from tcache.student.io import load_teacher_parts

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


def test_failed_build_leaves_resumable_state_and_no_cache(tmp_path, tiny_teacher, valid_jsonl, monkeypatch):
    """An error mid-build keeps the complete shards and the build state, never a manifest; --resume then
    finishes a cache whose shards equal an uninterrupted build's."""
    import tcache.teachercache.build as build_mod

    calls = {"n": 0}
    real = build_mod.TeacherPass.__call__

    def flaky(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        return real(self, *args, **kw)

    kw = dict(tokens=8 * 64, seq_len=64, top_k=4, batch_size=2, rows_per_shard=2)
    monkeypatch.setattr(build_mod.TeacherPass, "__call__", flaky)
    out = tmp_path / "c"
    with pytest.raises(RuntimeError) as err:
        build_cache(out, tiny_teacher, valid_jsonl, **kw)
    assert err.value.resumable
    assert not (out / schema.MANIFEST_FILE).exists() and (out / "build-state.json").exists()
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.h5", "shard-00001.h5"]
    with pytest.raises(TcacheError, match="no manifest.json"):
        load_manifest(out)
    monkeypatch.setattr(build_mod.TeacherPass, "__call__", real)
    resumed = build_cache(out, tiny_teacher, valid_jsonl, resume=True, **kw)
    full = build_cache(tmp_path / "full", tiny_teacher, valid_jsonl, **kw)
    assert resumed.build["resumed_at_row"] == 4 and not (out / "build-state.json").exists()
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in full.shards]


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
