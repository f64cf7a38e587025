"""The committed held-out sets of non-book text (benchmarks/heldout.py, benchmarks/data/): valid UTF-8 JSONL,
no tiny or duplicate documents, token counts as the manifest says, and no 50-character window shared with
the book corpus (a sample of it here; the script checks all of train.jsonl.xz and valid.jsonl). No network."""

from __future__ import annotations

import hashlib
import json
import lzma
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
sys.path.insert(0, str(ROOT / "benchmarks"))
import heldout  # noqa: E402

MANIFEST = json.loads((DATA / "heldout.json").read_text(encoding="utf-8"))
SETS = sorted(MANIFEST["sets"])
TRAIN_SAMPLE_BYTES = 4_000_000
VALID_SAMPLE_BYTES = 2_000_000


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    out = {}
    for name in SETS:
        raw = lzma.decompress((DATA / MANIFEST["sets"][name]["file"]).read_bytes()).decode("utf-8")  # strict
        assert raw.endswith("\n"), name
        docs = []
        for n, line in enumerate(raw.split("\n")[:-1], 1):
            rec = json.loads(line)
            assert list(rec) == ["text"] and isinstance(rec["text"], str) and rec["text"].strip(), (name, n)
            docs.append(rec["text"])
        out[name] = docs
    return out


def test_at_least_two_sets_of_different_kinds():
    assert len(SETS) >= 2
    assert len({MANIFEST["sets"][s]["kind"] for s in SETS}) == len(SETS)
    for s in SETS:
        for src in MANIFEST["sets"][s]["sources"]:
            assert src["version"] and len(src["sha256"]) == 64, (s, src["package"])


def test_sets_are_clean_documents(texts):
    for name, docs in texts.items():
        meta = MANIFEST["sets"][name]
        path = DATA / meta["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"], name
        assert path.stat().st_size < 1_000_000, name
        assert len(docs) == meta["documents"] and sum(map(len, docs)) == meta["characters"], name
        assert min(map(len, docs)) >= heldout.MIN_CHARS, name
        assert len(set(docs)) == len(docs), f"{name}: duplicate documents"
        for d in docs:
            assert d == heldout.clean_text(d), f"{name}: not cleaned: {d[:80]!r}"
            # no markup left: info node separators, menus and cross-references, Sphinx permalinks (the texts
            # themselves talk about HTML and SGML tags and entities, so those are not markup here)
            for bad in ("\x1f", "*note ", "*Note ", "* Menu:", "File: ", "¶", "Permalink to this"):
                assert bad not in d, f"{name}: {bad!r} in {d[:80]!r}"


def test_token_counts_match_manifest(texts, teacher_dir):
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(teacher_dir).backend_tokenizer
    for name, docs in texts.items():
        meta = MANIFEST["sets"][name]
        counts = meta["document_tokens"]
        assert len(counts) == len(docs) and sum(counts) == meta["tokens"], name
        assert meta["tokens_with_eos"] == meta["tokens"] + len(docs), name
        assert meta["tokens"] >= 0.99 * MANIFEST["method"]["target_tokens"], name
        sample = list(range(0, len(docs), 4))  # a quarter of each set keeps this under a few seconds
        got = [len(e.ids) for e in backend.encode_batch([docs[i] for i in sample], add_special_tokens=False)]
        assert got == [counts[i] for i in sample], name


def _corpus_sample(path: Path, nbytes: int) -> list[str]:
    """The complete JSONL records among the first `nbytes` (decompressed) bytes of a corpus file."""
    if path.suffix == ".xz":
        raw = lzma.LZMADecompressor().decompress(path.read_bytes()[:nbytes], max_length=nbytes)
    else:
        with open(path, "rb") as f:
            raw = f.read(nbytes)
    lines = raw.split(b"\n")
    return [json.loads(ln)["text"] for ln in lines[:-1] if ln.strip()] or [lines[0].decode("utf-8", "ignore")]


def test_window_check_finds_a_planted_passage(valid_jsonl):
    book = _corpus_sample(valid_jsonl, 200_000)[0]
    passage = book[10_000:10_000 + heldout.WINDOW]
    table = heldout.sorted_unique(heldout.window_hashes(book))
    planted = "Plain technical text about files. " + passage.upper().replace(" ", "\n") + " More text."
    assert heldout.in_sorted(heldout.window_hashes(planted), table).any()  # case and line breaks ignored
    shorter = "Plain technical text about files.#" + passage[:-1] + "#"  # 49 characters of it
    assert not heldout.in_sorted(heldout.window_hashes(shorter), table).any()


def test_no_window_shared_with_the_book_corpus(texts, shared, valid_jsonl):
    table = heldout.sorted_unique(np.concatenate([heldout.window_hashes(d) for docs in texts.values() for d in docs]))
    for path, nbytes in ((shared / "corpus" / "train.jsonl.xz", TRAIN_SAMPLE_BYTES),
                         (valid_jsonl, VALID_SAMPLE_BYTES)):
        books = _corpus_sample(path, nbytes)
        assert sum(map(len, books)) > nbytes // 2, path
        for book in books:
            hit = heldout.in_sorted(heldout.window_hashes(book), table)
            if hit.any():
                i = int(np.argmax(hit))
                pytest.fail(f"{path.name} shares a window with a held-out set: "
                            f"{heldout.normalise(book)[i:i + heldout.WINDOW]!r}")
    assert MANIFEST["overlap_check"]["shared_windows_in_written_sets"] == {"train": 0, "valid": 0}
