"""Shared fixtures: the shared pretrained teacher and corpus, a tiny random Llama, small caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub: a missing id must fail fast, not retry over the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TCACHE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    assert (SHARED / "teacher" / "config.json").is_file(), (
        f"shared assets not found at {SHARED}; clone next to ../shared or set TCACHE_SHARED"
    )
    return SHARED


@pytest.fixture(scope="session")
def teacher_dir(shared) -> Path:
    return shared / "teacher"


@pytest.fixture(scope="session")
def valid_jsonl(shared) -> Path:
    return shared / "corpus" / "valid.jsonl"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, teacher_dir) -> Path:
    """A random-init 4-layer Llama with an untied head and the shared tokenizer (so text tokenises)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16384, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    out = tmp_path_factory.mktemp("tiny_teacher")
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def text_head(valid_jsonl: Path, out: Path, chars: int, docs: int = 3) -> Path:
    """The first `chars` characters of the first `docs` held-out books as a JSONL file: tokenising all of
    valid.jsonl (4 MB) costs ~10 s per build or eval on 2 cores."""
    import json

    with open(valid_jsonl) as f:
        heads = [json.loads(next(f))["text"][:chars] for _ in range(docs)]
    out.write_text("".join(json.dumps({"text": h}) + "\n" for h in heads))
    return out


def build_cache(out: Path, teacher: Path, data: Path, tokens: int, **kw):
    from tcache.teachercache.config import BuildConfig
    from tcache.teachercache.build import build
    from tcache.text import DataSpec

    cfg = BuildConfig(teacher=str(teacher), data=DataSpec(str(data)), out=str(out), tokens=tokens,
                      device="cpu", **kw)
    return build(cfg)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory, teacher_dir, valid_jsonl) -> Path:
    """The shared teacher over 12 rows x 128 tokens of held-out text, 5 rows per shard (3 shards)."""
    out = tmp_path_factory.mktemp("caches") / "shared"
    build_cache(out, teacher_dir, valid_jsonl, tokens=12 * 128, seq_len=128, top_k=32, batch_size=4,
                rows_per_shard=5)
    return out


@pytest.fixture(scope="session")
def rank_cache(tmp_path_factory, tiny_teacher, valid_jsonl) -> Path:
    """The tiny teacher over 24 rows x 32 tokens, in batches of 8: the cache the multi-process tests (test_distributed,
    test_fsdp) split between ranks."""
    text = text_head(valid_jsonl, tmp_path_factory.mktemp("rank_text") / "head.jsonl", 8000)
    out = tmp_path_factory.mktemp("rank_cache") / "c"
    build_cache(out, tiny_teacher, text, tokens=24 * 32, seq_len=32, top_k=8, batch_size=8)
    return out


def tiny_llama_cache(tmp_path_factory, teacher_dir, valid_jsonl, layers: int) -> Path:
    """A cache of a random Llama of `layers` layers with head dim 16 (mlstm_kernels' Triton kernel's smallest),
    8 rows x 64 tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = tmp_path_factory.mktemp(f"l{layers}_teacher")
    LlamaForCausalLM(LlamaConfig(vocab_size=16384, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=False)).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(teacher)
    text = text_head(valid_jsonl, tmp_path_factory.mktemp(f"l{layers}_text") / "t.jsonl", 8000)
    out = tmp_path_factory.mktemp(f"l{layers}_cache") / "c"
    build_cache(out, teacher, text, tokens=8 * 64, seq_len=64, top_k=8, batch_size=8)
    return out


@pytest.fixture(scope="session")
def one_layer_cache(tmp_path_factory, teacher_dir, valid_jsonl) -> Path:
    """tiny_llama_cache of one layer: the smallest hybrid whose whole step compiles quickly (inductor's CPU code
    generation takes seconds per layer)."""
    return tiny_llama_cache(tmp_path_factory, teacher_dir, valid_jsonl, 1)


@pytest.fixture(scope="session")
def two_layer_cache(tmp_path_factory, teacher_dir, valid_jsonl) -> Path:
    """tiny_llama_cache of two layers: the smallest with a layer to stamp out (TCACHE_COMPILE_SCOPE=regions)."""
    return tiny_llama_cache(tmp_path_factory, teacher_dir, valid_jsonl, 2)


def teacher_fails_at_batch(mp: pytest.MonkeyPatch, n: int = 3) -> None:
    """Within `mp`'s context, the build's n-th teacher batch raises RuntimeError("simulated failure")."""
    import tcache.teachercache.build as build_mod

    calls = {"n": 0}
    real = build_mod.TeacherPass.__call__

    def flaky(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated failure")
        return real(self, *args, **kw)

    mp.setattr(build_mod.TeacherPass, "__call__", flaky)


def assert_resumed_as_uninterrupted(full: list[dict], resumed: list[dict], kept: int, terms: tuple, run_a: Path,
                                    run_b: Path) -> None:
    """A run resumed after `kept` logged steps logs what the uninterrupted run logged (rel 1e-5) and ends with its
    weights (1e-6)."""
    import torch

    from tcache.student.models.io import load_student

    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for r_full, r_res in zip(full[kept:], resumed[kept:]):
        for term in terms:
            assert r_res[term] == pytest.approx(r_full[term], rel=1e-5, abs=1e-7), (term, r_full, r_res)
    wa = load_student(run_a, torch.device("cpu"))[0].state_dict()
    wb = load_student(run_b, torch.device("cpu"))[0].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
