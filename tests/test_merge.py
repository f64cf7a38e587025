"""`tcache merge` (student/models/merge.py): the merged weights against a float64 weighted mean computed here, two
copies of one run and weights 1,0 giving that run bit for bit, byte-identical output for the same inputs, one-line
refusals (another teacher, family or recipe shape, bad weights), the ownership rules every output keeps, and the
merged run taken by eval, export, generate and a further stage II (`distill --init`)."""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import build_cache, text_head
from promises import Case
from test_cli_build import assert_clean_error
from tcache.cli.main import main
from tcache.student.training.checkpoint import cache_identity
from tcache.student.training.config import DistillConfig
from tcache.student.training.train import distill
from tcache.teachercache.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def other_text(out: Path) -> Path:
    """The first documents of the non-book training mixture (benchmarks/data): domain B's kind of text."""
    with lzma.open(ROOT / "benchmarks" / "data" / "train-mix.jsonl.xz", "rt") as f:
        docs = [json.loads(next(f))["text"][:4000] for _ in range(4)]
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher, valid_jsonl):
    """Hybrid experts A (books) and B (other text) of the tiny teacher, and students that must not merge with A: a
    window-16 hybrid, a v2 student, and a hybrid of another teacher."""
    import torch as _torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("merge")
    caches = {"books": tmp / "books", "other": tmp / "other", "third": tmp / "third"}
    small = dict(tokens=4 * 64, seq_len=64, top_k=8, batch_size=4)
    build_cache(caches["books"], tiny_teacher, text_head(valid_jsonl, tmp / "b.jsonl", 6000), **small)
    build_cache(caches["other"], tiny_teacher, other_text(tmp / "o.jsonl"), **small)
    _torch.manual_seed(7)  # another teacher: the tiny one's shape, other weights
    t2 = tmp / "teacher2"
    LlamaForCausalLM(LlamaConfig(vocab_size=16384, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)).save_pretrained(t2)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(t2)
    build_cache(caches["third"], t2, tmp / "b.jsonl", **small)
    base = dict(recipe="hybrid", steps=1, stage1_tokens=2 * 64, batch_size=2, grad_accum=1, lr=1e-3)
    out = {}
    for name, cache, extra in (("a", "books", {"seed": 1}), ("b", "other", {"seed": 2}),
                               ("w16", "books", {"window": 16}),
                               ("v2", "books", {"recipe": "v2", "stage1_tokens": None}),
                               ("t2", "third", {})):
        out[name] = tmp / name
        distill(DistillConfig(cache=str(caches[cache]), out=str(out[name]), **{**base, **extra}))
    out["caches"] = {"a": caches["books"], "b": caches["other"]}
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def test_two_copies_or_weights_one_zero_give_the_run_bit_for_bit(tmp_path, runs):
    copy = tmp_path / "a-copy"
    shutil.copytree(runs["a"], copy)
    r = run("merge", runs["a"], copy, "--out", tmp_path / "aa")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "aa" / "model.safetensors").read_bytes() == (runs["a"] / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "aa" / "merge.json").read_text())["same_init"] and "--seed" not in r.output
    for w, same in (("1,0", "a"), ("0,1", "b")):
        out = tmp_path / f"m{w}"
        assert run("merge", runs["a"], runs["b"], "--out", out, "--weights", w).exit_code == 0
        got, want = weights(out), weights(runs[same])
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_merged_weights_are_the_float64_weighted_mean_and_the_manifest_names_them(tmp_path, runs):
    out = tmp_path / "m"
    r = run("merge", runs["a"], runs["b"], runs["a"], "--out", out, "--weights", "0.25,0.5,0.25")
    assert r.exit_code == 0, r.output
    a, b, got = weights(runs["a"]), weights(runs["b"]), weights(out)
    for k in a:
        want = (0.25 * a[k].double() + 0.5 * b[k].double() + 0.25 * a[k].double()).to(a[k].dtype)
        assert torch.equal(got[k], want), k
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the experts differ: the test is not vacuous
    manifest = json.loads((out / "merge.json").read_text())
    assert [r_["weight"] for r_ in manifest["runs"]] == [0.25, 0.5, 0.25]
    assert [r_["run"] for r_ in manifest["runs"]] == [str(runs["a"]), str(runs["b"]), str(runs["a"])]
    assert [r_["seed"] for r_ in manifest["runs"]] == [1, 2, 1] and manifest["same_init"] is False
    assert "different --seed (1, 2, 1)" in " ".join(r.output.split())
    ids = [r_["cache"]["identity"] for r_ in manifest["runs"]]
    assert ids[:2] == [cache_identity(load_manifest(runs["caches"][n])) for n in "ab"] and ids[0] != ids[1]
    doc = json.loads((out / "student.json").read_text())
    assert doc["merged"]["weights"] == [0.25, 0.5, 0.25] and doc["config"]["window"] == 32
    marker = json.loads((out / ".tcache-output.json").read_text())
    assert marker["kind"] == "run" and "merge.json" in marker["files"]
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != ".tcache-output.json")


def test_the_same_inputs_give_byte_identical_output(tmp_path, runs):
    for name in ("x", "y"):
        assert run("merge", runs["a"], runs["b"], "--out", tmp_path / name).exit_code == 0
    files = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "y").iterdir())
    for f in files:
        assert (tmp_path / "x" / f).read_bytes() == (tmp_path / "y" / f).read_bytes(), f


@pytest.mark.parametrize("other, flags, says", [
    ("w16", (), "differs from"),
    ("v2", (), "in family ('xlstm' vs 'hybrid')"),
    ("t2", (), "in teacher weights"),
    ("b", ("--weights", "0.5"), "1 weights for 2 runs"),
    ("b", ("--weights", "0.7,0.7"), "sum to 1.4"),
    ("b", ("--weights", "-0.5,1.5"), "non-negative"),
    ("b", ("--weights", "a,b"), "not a comma-separated list of numbers"),
    ("missing", (), "is not a finished tcache student"),
    (None, (), "needs two runs or more"),
])
def test_every_refusal_is_one_line(tmp_path, runs, other, flags, says):
    others = [] if other is None else [runs.get(other, tmp_path / "nothing-here")]
    r = run("merge", runs["a"], *others, "--out", tmp_path / "m", *flags)
    assert_clean_error(r, says)
    if other == "w16":
        assert "window (16 vs 32)" in r.output
    assert not (tmp_path / "m").exists()


def test_merge_output_keeps_the_ownership_rules(tmp_path, runs):
    """A user's files in --out are never touched (with or without --overwrite); a cache, an input or an existing
    run without --overwrite is refused; with --overwrite a merged run is replaced."""
    user = Case(tmp_path, {})
    mine = user.user("mine/notes.txt")
    for flags in ((), ("--overwrite",)):
        assert_clean_error(run("merge", runs["a"], runs["b"], "--out", mine.parent, *flags), "did not write")
    assert_clean_error(run("merge", runs["a"], runs["b"], "--out", runs["caches"]["a"]), "not a distill run")
    assert_clean_error(run("merge", runs["a"], runs["b"], "--out", runs["a"]), "is one of the runs being merged")
    out = tmp_path / "m"
    assert run("merge", runs["a"], runs["b"], "--out", out, "--weights", "1,0").exit_code == 0
    assert_clean_error(run("merge", runs["a"], runs["b"], "--out", out), "pass --overwrite")
    assert run("merge", runs["a"], runs["b"], "--out", out, "--weights", "0,1", "--overwrite").exit_code == 0
    assert weights(out).keys() and all(torch.equal(v, weights(runs["b"])[k]) for k, v in weights(out).items())
    user.user("m/my-results.csv")  # a user's file put into the merged run: now nothing there is replaced
    assert_clean_error(run("merge", runs["a"], runs["b"], "--out", out, "--overwrite"), "my-results.csv")
    user.check_owned()


def test_a_merged_run_evaluates_exports_generates_and_trains_a_further_stage_two(tmp_path, runs, valid_jsonl):
    merged = tmp_path / "m"
    assert run("merge", runs["a"], runs["b"], "--out", merged).exit_code == 0
    r = run("eval", merged, "--data", valid_jsonl, "--tokens", 128, "--seq-len", 64, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["perplexity"] > 1
    assert run("export", merged, "--out", tmp_path / "hf").exit_code == 0
    r = run("generate", tmp_path / "hf", "--prompt", "The", "--max-new-tokens", 4)
    assert r.exit_code == 0, r.output
    cache = runs["caches"]["a"]
    r = run("distill", cache, "--out", tmp_path / "s2", "--recipe", "hybrid", "--stage", 2, "--init", merged,
            "--steps", 1, "--batch-size", 2, "--grad-accum", 1)
    assert r.exit_code == 0, r.output
    assert_clean_error(run("distill", cache, "--out", tmp_path / "s3", "--recipe", "hybrid", "--stage", 2, "--init",
                           merged, "--window", 16, "--steps", 1, "--batch-size", 2), "--init", "window (32 vs 16)")


def test_the_benchmarks_domain_split_is_disjoint_and_repeatable_and_its_targets_read_the_ratios(tmp_path):
    """benchmarks/merge.py: domain B's held-out documents are never B's training documents, the split is the same
    on a second run, and each target is the ratio of the two perplexities it names."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import merge as bench

    counts = []
    for k in ("1", "2"):
        counts.append(bench.split_domain_b(bench.DOMAIN_B, tmp_path / f"t{k}", tmp_path / f"h{k}", 10, 300))
    assert counts[0] == counts[1] and counts[0]["train"] + counts[0]["heldout"] == 300 and counts[0]["heldout"] > 10
    assert (tmp_path / "t1").read_bytes() == (tmp_path / "t2").read_bytes()
    train = {json.loads(x)["text"] for x in (tmp_path / "t1").read_text().splitlines()}
    held = {json.loads(x)["text"] for x in (tmp_path / "h1").read_text().splitlines()}
    assert train and held and not train & held
    rows = {"a": {"ppl": {"books": 30.0, "b-heldout": 90.0}}, "b": {"ppl": {"books": 40.0, "b-heldout": 50.0}},
            "merged": {"ppl": {"books": 30.3, "b-heldout": 52.0}}, "a-qk": {"ppl": {"books": 30.2, "b-heldout": 90.0}},
            "mix": {"ppl": {"books": 31.0, "b-heldout": 51.0}}}
    t = bench.targets(rows)
    assert t["merge within 2% of A on books"] == {"ratio": 1.01, "met": True}
    assert t["merge within 2% of B on B's held-out"] == {"ratio": 1.04, "met": False}
    assert t["merge better than A on B's held-out"]["met"] and t["merge better than B on books"]["met"]
    assert t["step 3 within 0.5% on books"] == {"ratio": round(30.2 / 30, 4), "met": False}
    assert t["step 3 within 0.5% on b-heldout"]["met"] and not t["merge vs mixture on b-heldout"]["met"]
