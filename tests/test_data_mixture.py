"""`tcache build` over several `--data` sources with `--data-weights`: the cached rows, the interleaving and the
per-source token counts against an independent re-tokenisation; one `--data` unchanged; `--resume`; bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml

from conftest import build_cache, teacher_fails_at_batch
from independent_check import assert_same_files, packed_reference, read_cache
from tcache.teachercache import schema
from tcache.teachercache.manifest import Manifest, load_manifest
from test_cli_build import assert_clean_error, assert_no_cache, run

SEQ, ROWS = 32, 40  # 1,280 tokens: ~40 documents, so the interleaving switches source many times
KW = dict(seq_len=SEQ, top_k=4, batch_size=4, rows_per_shard=6)


def cli_args(teacher, *data, rows=ROWS):
    return ["build", "--teacher", teacher, *[a for d in data for a in ("--data", d)], "--tokens", rows * SEQ,
            "--seq-len", SEQ, "--top-k", 4, "--batch-size", 4, "--shard-rows", 6, "--device", "cpu"]


def write_docs(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, valid_jsonl):
    """Small JSONL sources cut from two held-out books: three of 80 documents of 20-250 characters (about 5-60
    tokens), one empty document in the first (skipped, as a single source skips it); one of three documents."""
    d = tmp_path_factory.mktemp("mixture")
    with open(valid_jsonl) as f:
        books = [json.loads(next(f))["text"] for _ in range(2)]

    def cut(text, n):
        out, pos = [], 0
        for k in range(n):
            size = 20 + (k * 37) % 230
            out.append(text[pos:pos + size])
            pos += size
        return out

    a = cut(books[0], 80)
    a[5] = ""
    return {"a": write_docs(d / "books.jsonl", a), "b": write_docs(d / "docs.jsonl", cut(books[1], 80)),
            "c": write_docs(d / "notes.jsonl", cut(books[1][30000:], 80)),
            "tiny": write_docs(d / "tiny.jsonl", cut(books[1][5000:], 3)), "dir": d}


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)


def documents(path, tokenizer) -> list[list[int]]:
    """Each non-empty document's ids (transformers, no special tokens) and one EOS: re-tokenised here."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    eos = tokenizer.eos_token_id
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts if t]


def reference_mixture(docs: list[list[list[int]]], weights, tokens: int):
    """The documented rule written out again: the next document from the source with the largest
    share * drawn_total - drawn_source (first on ties), until the budget is covered. Returns the token stream
    cut to the budget, the source of every token, and the order in which sources were drawn."""
    shares = [w / sum(weights) for w in weights]
    drawn, nxt = [0] * len(docs), [0] * len(docs)
    stream, owner, order = [], [], []
    while len(stream) < tokens:
        total = sum(drawn)
        i = max(range(len(docs)), key=lambda j: (shares[j] * total - drawn[j], -j))
        doc = docs[i][nxt[i]]
        nxt[i] += 1
        drawn[i] += len(doc)
        stream += doc
        owner += [i] * len(doc)
        order.append(i)
    return np.asarray(stream[:tokens]), np.asarray(owner[:tokens]), order


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_teacher, sources):
    """A 3:1 mixture built through the CLI."""
    out = tmp_path_factory.mktemp("mixed") / "c"
    r = run(*cli_args(tiny_teacher, sources["a"], sources["b"]), "--data-weights", "3,1", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_mixture_rows_and_counts_match_an_independent_interleaving(mixed, sources, tokenizer):
    docs = [documents(sources["a"], tokenizer), documents(sources["b"], tokenizer)]
    stream, owner, order = reference_mixture(docs, [3, 1], ROWS * SEQ)
    manifest, raw = read_cache(mixed)
    # the rows are the reference stream: same documents, same interleaving, packed across document ends
    np.testing.assert_array_equal(raw["input_ids"].astype(np.int64), stream.reshape(ROWS, SEQ))
    assert order[:2] == [0, 1] and order.count(1) > 5  # the tie goes to the first --data; then B is furthest below
    mixture = manifest["dataset"]["mixture"]
    counts = [int((owner == i).sum()) for i in range(2)]
    assert [m["tokens"] for m in mixture] == counts and sum(counts) == manifest["tokens"] == ROWS * SEQ
    assert [m["weight"] for m in mixture] == [0.75, 0.25]
    assert [{k: m[k] for k in ("path", "config", "split", "text_field")} for m in mixture] == [
        {"path": str(sources[s]), "config": None, "split": "train", "text_field": "text"} for s in ("a", "b")]
    # every prefix of the cache holds each source's share to within one document's tokens
    longest = max(len(d) for src in docs for d in src)
    for n in range(SEQ, ROWS * SEQ + 1, SEQ):
        for i, share in enumerate((0.75, 0.25)):
            assert abs(int((owner[:n] == i).sum()) - share * n) <= longest, (n, i)
    assert not manifest["data_exhausted"]


def test_three_sources_follow_the_largest_deficit_rule(tmp_path, tiny_teacher, sources, tokenizer):
    """With three sources "furthest below its share" (largest share * drawn - drawn_source) is not "smallest
    drawn_source / share" (the two agree for two sources): the rows are the documented rule's."""
    names = ("a", "b", "c")
    r = run(*cli_args(tiny_teacher, *(sources[n] for n in names)), "--data-weights", "5,3,2", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    stream, owner, _ = reference_mixture([documents(sources[n], tokenizer) for n in names], [5, 3, 2], ROWS * SEQ)
    manifest, raw = read_cache(tmp_path / "c")
    np.testing.assert_array_equal(raw["input_ids"].astype(np.int64), stream.reshape(ROWS, SEQ))
    assert [m["tokens"] for m in manifest["dataset"]["mixture"]] == [int((owner == i).sum()) for i in range(3)]


def test_mixture_from_a_config_file_and_its_saved_config_are_the_same_cache(mixed, tiny_teacher, sources):
    saved = yaml.safe_load((mixed / "config.yaml").read_text())
    assert saved["data"]["path"] == [str(sources["a"]), str(sources["b"])] and saved["data_weights"] == [3.0, 1.0]
    d = sources["dir"]
    conf = d / "mix.yaml"
    conf.write_text(yaml.safe_dump({"teacher": str(tiny_teacher), "data": [str(sources["a"]), str(sources["b"])],
                                    "data_weights": [1.5, 0.5], "tokens": ROWS * SEQ, "seq_len": SEQ, "top_k": 4,
                                    "batch_size": 4, "shard_rows": 6, "device": "cpu"}))
    for name, args in (("from-yaml", ["--config", conf]), ("from-saved", ["--config", mixed / "config.yaml"])):
        r = run("build", *args, "--out", d / name)
        assert r.exit_code == 0, r.output
        assert_same_files(d / name, mixed)
        assert load_manifest(d / name).dataset == load_manifest(mixed).dataset
    # stats and verify read a mixture's cache; stats shows each source with its weight and tokens
    r = run("verify", mixed)
    assert r.exit_code == 0, r.output
    r = run("stats", mixed, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["dataset"] == load_manifest(mixed).dataset, r.output
    r = run("stats", mixed)
    assert r.exit_code == 0 and "mixture of 2 sources" in r.output and "weight 0.75" in r.output, r.output


def test_one_data_is_the_single_source_build(tmp_path, tiny_teacher, sources, tokenizer):
    """One --data (with or without a weight): the rows of the documented single-source packing, the manifest's
    keys and `dataset` as before mixtures, and the shards of a build through the library's DataSpec."""
    r = run(*cli_args(tiny_teacher, sources["a"]), "--out", tmp_path / "cli")
    assert r.exit_code == 0, r.output
    manifest, raw = read_cache(tmp_path / "cli")
    np.testing.assert_array_equal(raw["input_ids"].astype(np.int64),
                                  packed_reference(sources["a"], tokenizer, SEQ, ROWS))
    assert set(manifest) == {f.name for f in dataclasses.fields(Manifest)}
    assert manifest["dataset"] == {"path": str(sources["a"]), "config": None, "split": "train", "text_field": "text"}
    saved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(sources["a"]) and saved["data_weights"] is None
    build_cache(tmp_path / "lib", tiny_teacher, sources["a"], tokens=ROWS * SEQ, **KW)
    assert_same_files(tmp_path / "cli", tmp_path / "lib")
    r = run(*cli_args(tiny_teacher, sources["a"]), "--data-weights", "2", "--out", tmp_path / "weighted")
    assert r.exit_code == 0, r.output
    assert_same_files(tmp_path / "weighted", tmp_path / "lib")
    assert load_manifest(tmp_path / "weighted").dataset == manifest["dataset"]


def test_resume_continues_the_same_interleaving(tmp_path, tiny_teacher, sources, mixed):
    """A mixture build whose third teacher batch failed, then --resume: the uninterrupted build's shards and
    per-source counts (the resume re-reads both sources from their start and re-draws the same documents)."""
    import tcache.teachercache.build as build_mod
    from tcache.teachercache.config import BuildConfig, DataSources

    out = tmp_path / "c"
    cfg = BuildConfig(teacher=str(tiny_teacher), data=DataSources((str(sources["a"]), str(sources["b"]))),
                      data_weights=(3, 1), out=str(out), tokens=ROWS * SEQ, device="cpu", **KW)
    with pytest.MonkeyPatch.context() as mp:
        teacher_fails_at_batch(mp)
        with pytest.raises(RuntimeError):
            build_mod.build(cfg)
    assert not (out / schema.MANIFEST_FILE).exists() and sorted(p.name for p in out.glob("shard-*.h5")) == [
        "shard-00000.h5"]
    # other shares are another interleaving: refused
    assert_clean_error(run(*cli_args(tiny_teacher, sources["a"], sources["b"]), "--data-weights", "1,1",
                           "--out", out, "--resume"), "--resume", "differs", "data_shares")
    resumed = build_mod.build(dataclasses.replace(cfg, resume=True))
    assert resumed.build["resumed_at_row"] == 6
    assert_same_files(out, mixed)
    assert resumed.dataset == load_manifest(mixed).dataset


def test_a_source_that_runs_out_is_one_line(tmp_path, tiny_teacher, sources):
    """The three-document source cannot give half of 40 rows: one line naming it and the fixes, no cache, and
    no offer to --resume (a resume would run out at the same document). An empty source fails before anything
    is written."""
    out = tmp_path / "c"
    r = run(*cli_args(tiny_teacher, sources["a"], sources["tiny"]), "--out", out)
    assert_clean_error(r, f"--data {sources['tiny']} ran out of documents", "--data-weights", "--tokens")
    assert "resume with" not in r.output
    assert_no_cache(out)
    empty = write_docs(tmp_path / "empty.jsonl", [""])
    r = run(*cli_args(tiny_teacher, sources["a"], empty), "--out", tmp_path / "e")
    assert_clean_error(r, f"--data {empty}", "no text")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("weights, fragments", [
    ("0.7", ("--data-weights gives 1 weight(s) for 2 --data", "one positive number per --data")),
    ("1,2,3", ("--data-weights gives 3 weight(s) for 2 --data",)),
    ("1,-1", ("--data-weights: '-1' is not a positive number", "e.g. --data-weights 1,1")),
    ("0,1", ("--data-weights: '0' is not a positive number",)),
    ("1,abc", ("--data-weights: 'abc' is not a number",)),
    ("nan,1", ("--data-weights: 'nan' is not a positive number",)),
])
def test_bad_weights_are_one_line(tmp_path, tiny_teacher, sources, weights, fragments):
    r = run(*cli_args(tiny_teacher, sources["a"], sources["b"]), "--data-weights", weights, "--out", tmp_path / "c")
    assert_clean_error(r, *fragments)
    assert not (tmp_path / "c").exists()


def test_bad_mixture_config_files_are_one_line(tmp_path, tiny_teacher, sources):
    base = f"teacher: {tiny_teacher}\ntokens: 1k\nout: {tmp_path / 'c'}\n"
    for text, fragments in ((f"data: [{sources['a']}, {sources['b']}]\ndata_weights: [1]\n",
                             ("--data-weights gives 1 weight(s) for 2 --data",)),
                            (f"data: [{sources['a']}, {sources['a']}]\n", (f"--data {sources['a']} is given twice",)),
                            (f"data: [{sources['a']}, {sources['b']}]\ndata_weights: [1, x]\n",
                             ("'x' is not a number",))):
        conf = tmp_path / "c.yaml"
        conf.write_text(base + text)
        assert_clean_error(run("build", "--config", conf), *fragments)
    assert not (tmp_path / "c").exists()
