"""benchmarks/quality.py's per-set columns and benchmarks/window_cut.py's untrained window cut.

The arithmetic is checked against values worked out by hand from given perplexities (math.log directly, not
the benchmark's functions), and collect() against a work directory of fake `tcache eval` outputs. The window
cut is scored by `tcache eval`'s own code path and compared with the teacher's perplexity computed here
independently (transformers' forward and a cross-entropy over windows cut by hand): equal when the window
covers the whole eval window, worse when it is small.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

from conftest import REPO, text_head

sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402
import window_cut  # noqa: E402


# ---- arithmetic ----

def test_recovery_hand_values():
    # teacher 20, cut 80: ln 80 - ln 40 = ln 2 is half of ln 80 - ln 20 = ln 4
    assert quality.recovery(40.0, 80.0, 20.0) == pytest.approx(0.5, abs=1e-12)
    assert quality.recovery(80.0, 80.0, 20.0) == 0.0  # no better than the cut
    assert quality.recovery(20.0, 80.0, 20.0) == pytest.approx(1.0, abs=1e-12)  # the teacher
    assert quality.recovery(160.0, 80.0, 20.0) == pytest.approx(-0.5, abs=1e-12)  # worse than the cut
    # arbitrary numbers, worked out with math.log
    ppl, cut, teacher = 31.7, 44.2, 29.3
    want = (math.log(44.2) - math.log(31.7)) / (math.log(44.2) - math.log(29.3))
    assert quality.recovery(ppl, cut, teacher) == pytest.approx(want, rel=1e-12)
    assert 0 < want < 1
    assert quality.recovery(30.0, 29.3, 29.3) is None  # a cut equal to the teacher leaves nothing to recover


def test_gap_closed_is_the_existing_log_gap():
    # the log-gap closed vs a CE-only baseline, as the README's table: v1 98.43 vs CE-only 101.82, teacher 29.32
    want = (math.log(101.82) - math.log(98.43)) / (math.log(101.82) - math.log(29.32))
    assert quality.gap_closed(98.43, 101.82, 29.32) == pytest.approx(want, rel=1e-12)
    assert round(100 * want, 1) == 2.7


def test_ratio_to_teacher():
    assert quality.ratio_to_teacher(58.64, 29.32) == pytest.approx(2.0, rel=1e-12)
    assert quality.ratio_to_teacher(29.32, 29.32) == 1.0


def test_set_columns():
    teacher = {"valid": 30.0, "pydocs": 300.0}
    cut = {"valid": 60.0, "pydocs": 900.0}
    cols = quality.set_columns({"valid": 45.0, "pydocs": 300.0, "foldoc": 250.0}, teacher, cut)
    assert cols["valid"]["vs_teacher"] == pytest.approx(1.5)
    assert cols["valid"]["recovery"] == pytest.approx(
        (math.log(60) - math.log(45)) / (math.log(60) - math.log(30)))
    assert cols["pydocs"] == {"perplexity": 300.0, "vs_teacher": 1.0, "recovery": pytest.approx(1.0)}
    assert cols["foldoc"] == {"perplexity": 250.0}  # the teacher has no foldoc score: no ratio, no recovery
    no_cut = quality.set_columns({"valid": 45.0}, teacher, None)
    assert no_cut == {"valid": {"perplexity": 45.0, "vs_teacher": 1.5}}


def test_windows_and_names():
    assert quality.row_window("hybrid") == 32
    assert quality.row_window("hybrid-w16") == 16
    assert quality.row_window("hybrid-mlstm-only") is None  # no window branch: no cut to recover from
    assert quality.row_window("window-only") == 32
    assert quality.row_window("v1") is None
    assert quality.cut_windows(quality.DEFAULT_RUNS) == [16, 32, 64]
    assert quality.cut_windows(["v1", "v2"]) == []
    assert quality.describe("cut-w16") == ("window-cut", ["--window", "16", "--sinks", "4"], None)
    assert quality.set_name("benchmarks/data/heldout-pydocs.jsonl.xz") == "pydocs"
    assert [quality.set_name(p) for p in quality.HELDOUT] == ["foldoc", "gnuinfo", "pydocs"]


def test_smoke_defaults_and_required_flags():
    a = quality.parse_args(["--smoke", "--runs", "hybrid,v1"])
    assert a.runs == "hybrid,v1" and a.heldout_tokens == "4k" and Path(a.teacher).name == "teacher"
    assert a.valid == str(Path(a.work) / "valid-head.jsonl") and a.valid_head is not None
    b = quality.parse_args(["--teacher", "T", "--train", "X", "--valid", "V", "--work", "W", "--out", "O"])
    assert b.heldout_tokens == "400k" and b.eval_tokens == "2M" and len(b.heldout.split(",")) == 3
    with pytest.raises(SystemExit):
        quality.parse_args(["--teacher", "T"])


def _fake_eval(path: Path, ppl: float, tokens: int = 1000) -> None:
    path.write_text(json.dumps({"perplexity": ppl, "tokens_scored": tokens, "params": 7}, indent=2))


def test_collect_writes_ratios_and_recovery(tmp_path):
    """collect() on fake eval outputs: every row and the teacher per set, ratios and recovery vs the row's cut."""
    ppl = {"teacher": {"": 30.0, "gnuinfo": 200.0},
           "cut-w32": {"": 90.0, "gnuinfo": 800.0},
           "hybrid": {"": 45.0, "gnuinfo": 400.0},
           "hybrid-mlstm-only": {"": 50.0, "gnuinfo": 500.0}}
    for name, by in ppl.items():
        for s, p in by.items():
            _fake_eval(tmp_path / f"{name}.eval{'.heldout-' + s if s else ''}.json", p)
    a = argparse.Namespace(heldout="data/heldout-gnuinfo.jsonl.xz", heldout_tokens="4k", valid="v.jsonl",
                           eval_tokens="2M", tokens_per_run="1k", lr="1e-3", grad_accum="1", stage1_tokens="1k")
    names = ["hybrid", "hybrid-mlstm-only", "cut-w32"]
    result = quality.collect(tmp_path, names, a, {}, 0.0)
    rows = result["runs"]
    assert result["teacher"]["sets"]["gnuinfo"]["perplexity"] == 200.0
    h = rows["hybrid"]["sets"]
    assert rows["hybrid"]["cut"] == "cut-w32"
    assert h["valid"]["vs_teacher"] == pytest.approx(1.5)
    assert h["gnuinfo"]["vs_teacher"] == pytest.approx(2.0)
    assert h["valid"]["recovery"] == pytest.approx((math.log(90) - math.log(45)) / (math.log(90) - math.log(30)))
    assert h["gnuinfo"]["recovery"] == pytest.approx(0.5)  # ln 800/400 = ln 2, half of ln 800/200 = ln 4
    assert "recovery" not in rows["hybrid-mlstm-only"]["sets"]["valid"]
    assert rows["cut-w32"]["untrained"] and rows["cut-w32"]["sets"]["gnuinfo"]["vs_teacher"] == pytest.approx(4.0)
    text = quality.tables(result)
    assert "| hybrid | cut-w32 | 45.00 | 1.500 | 63.1% | 400.00 | 2.000 | 50.0% |" in text
    assert "| cut-w32 |  | 90.00 | 3.000 | (cut) | 800.00 | 4.000 | (cut) |" in text


def test_collect_reads_the_recall_probe_per_row_and_its_share_of_the_teachers(tmp_path):
    """`tcache probe --json` outputs beside the evals: each row's accuracy per distance, and the table's share of
    the teacher's (computed here by hand: 0.2 / 0.8 = 0.25); a row without a probe gets empty cells."""
    for name, ppl in (("teacher", 30.0), ("hybrid", 45.0), ("window-only", 60.0)):
        _fake_eval(tmp_path / f"{name}.eval.json", ppl)
    recall = {"teacher": {"16": 0.9, "256": 0.8}, "hybrid": {"16": 0.9, "256": 0.2}}
    for name, acc in recall.items():
        (tmp_path / f"{name}.probe.json").write_text(json.dumps({"probe": "recall", "accuracy": acc}, indent=2))
    a = argparse.Namespace(heldout="", heldout_tokens="4k", valid="v.jsonl", eval_tokens="2M", tokens_per_run="1k",
                           lr="1e-3", grad_accum="1", stage1_tokens="1k")
    result = quality.collect(tmp_path, ["hybrid", "window-only"], a, {}, 0.0)
    assert result["teacher"]["recall"] == recall["teacher"] and result["runs"]["hybrid"]["recall"] == recall["hybrid"]
    assert "recall" not in result["runs"]["window-only"]
    text = quality.tables(result)
    assert "| hybrid | 0.900 | 1.000 | 0.200 | 0.250 |" in text
    assert "| window-only |  |  |  |  |" in text


def test_mixture_rows_train_from_the_mixture_cache_and_the_presets_know_them():
    """The mixture rows are rows of RUNS, in the issue-33 preset, and default to the committed mixture file."""
    assert quality.MIX_ROWS <= set(quality.RUNS) and quality.MIX_ROWS <= set(quality.PRESETS["issue33-mixture"])
    a = quality.parse_args(["--teacher", "T", "--train", "X", "--valid", "V", "--work", "W", "--out", "O"])
    assert Path(a.mix_data) == quality.MIX_DATA and a.mix_weights == "0.75,0.25"
    assert quality.row_window("hybrid-joint-mix") == 32


# ---- the window cut ----

SEQ = 64
WINDOWS = 3


@pytest.fixture(scope="module")
def text(tmp_path_factory, valid_jsonl) -> Path:
    return text_head(valid_jsonl, tmp_path_factory.mktemp("cut") / "text.jsonl", 2_000)


def teacher_perplexity(teacher_dir: Path, data: Path) -> float:
    """The teacher's perplexity on the first WINDOWS windows of SEQ tokens of `data` (documents + EOS,
    concatenated), from transformers' forward: no tcache code."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    ids = []
    for line in data.read_text().splitlines():
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    x = torch.tensor(ids[:WINDOWS * SEQ]).view(WINDOWS, SEQ)
    lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = lm(input_ids=x).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    return math.exp(float(nll))


def eval_perplexity(model: Path, data: Path) -> dict:
    """`tcache eval MODEL --data DATA --tokens WINDOWS*SEQ --seq-len SEQ --device cpu`, in process."""
    from tcache.student.inference.eval import EvalConfig, perplexity
    from tcache.text import DataSpec

    r = perplexity(EvalConfig(model=str(model), data=DataSpec(str(data)), tokens=WINDOWS * SEQ, seq_len=SEQ,
                              device="cpu"))
    assert r["windows"] == WINDOWS
    return r


def cut_perplexity(teacher_dir: Path, out: Path, data: Path, window: int) -> float:
    """The cut written by window_cut.py, scored as `tcache eval` scores a student."""
    window_cut.save_window_cut(str(teacher_dir), out, window)
    r = eval_perplexity(out, data)
    assert r["kind"] == "tcache-student"
    return r["perplexity"]


def test_window_cut_covering_the_window_is_the_teacher(tmp_path, teacher_dir, text):
    want = teacher_perplexity(teacher_dir, text)
    # W = SEQ: every query's window reaches position 0, so the cut attends to the whole causal prefix
    got = cut_perplexity(teacher_dir, tmp_path / "cut", text, SEQ)
    assert got == pytest.approx(want, rel=1e-5)  # fp32 rounding only: 4e-7 measured
    # and `tcache eval` of the teacher itself (its HF path), on the same windows
    assert got == pytest.approx(eval_perplexity(teacher_dir, text)["perplexity"], rel=1e-5)
    doc = json.loads((tmp_path / "cut" / "student.json").read_text())
    assert doc["config"]["branches"] == "window" and doc["trained"]["tokens"] == 0


def test_small_window_cut_is_worse(tmp_path, teacher_dir, text):
    want = teacher_perplexity(teacher_dir, text)
    assert cut_perplexity(teacher_dir, tmp_path / "cut", text, 8) > 1.05 * want


def test_every_preset_names_known_rows_and_the_windows_get_their_cuts():
    """--runs presets expand to rows quality.py defines; issue 24's frontier gets a window cut per window it uses."""
    assert all(name in quality.RUNS for rows in quality.PRESETS.values() for name in rows)
    assert quality.PRESETS["issue24"] == quality.PRESETS["issue24-mixers"] + quality.PRESETS["issue24-frontier"]
    assert quality.cut_windows(quality.PRESETS["issue24"]) == [16, 32, 64, 128, 256]


@pytest.mark.parametrize("name", sorted(n for n in quality.RUNS))
def test_every_row_is_a_valid_distill_command(name, tmp_path):
    """Each row's flags, as quality.py passes them to `tcache distill`, parse into a DistillConfig that passes its own
    checks (a row refused at the GPU call costs the whole call's row)."""
    recipe, flags, _ = quality.RUNS[name]
    distill_config([str(tmp_path), "--out", str(tmp_path / "s"), "--recipe", recipe, "--tokens", "1k", "--seed", "0",
                    *[x.format(teacher=str(tmp_path)) for x in flags]])


def distill_config(args: list[str]):
    """The DistillConfig `tcache distill ARGS` would run with (its checks included), without running it."""
    from tcache.cli.distill import distill
    from tcache.cli.options import config_from
    from tcache.student.training.config import DistillConfig

    return config_from(DistillConfig, distill.make_context("distill", args).params)


def test_a_rows_stage1_tokens_win_over_the_runs_default(tmp_path):
    """quality.py passes --stage1-tokens from its own flag first and the row's flags last: the row's value holds."""
    _, flags, _ = quality.RUNS["hybrid-joint-s1-5M"]
    cfg = distill_config([str(tmp_path), "--out", str(tmp_path / "s"), "--recipe", "hybrid", "--stage1-tokens", "2.5M",
                          *flags])
    assert cfg.stage1_tokens == 5_000_000
