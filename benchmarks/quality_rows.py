"""quality.py's rows and the arithmetic of its tables: what each row trains (its distill flags and CE-only
baseline), the window cut it is measured against, log-gap closed, ratio to the teacher and recovery
(tests/test_quality_tables.py)."""

from __future__ import annotations

import math
from pathlib import Path

from harness.env import ROOT

# name -> (recipe, extra distill flags, baseline for the log-gap)
RUNS = {
    "v1": ("v1", [], "v1-ce-only"),
    "v1-ce-only": ("v1", ["--alpha", "0", "--beta", "0"], None),
    "v1-ce+kd": ("v1", ["--beta", "0"], "v1-ce-only"),
    "v1-ce+align": ("v1", ["--alpha", "0"], "v1-ce-only"),
    "v1-online": ("v1", ["--online-teacher", "{teacher}"], "v1-ce-only"),
    "v2": ("v2", [], "v2-ce-only"),
    "v2-ce-only": ("v2", ["--alpha", "0", "--beta", "0"], None),
    # the papers' "xLSTM baseline": v1's blocks with a random embedding and head, CE only
    "scratch": ("v1", ["--from-scratch", "--alpha", "0", "--beta", "0"], None),
    # knob: KD-heavy (no CE, fixed T = 1), not part of the default set
    "v1-kd-heavy": ("v1", ["--alpha", "0.9", "--beta", "0.1", "--temperature", "1"], "v1-ce-only"),
    # the hybrid recipe (Hauzenberger et al. 2026) and its ablations; the recipe's own lr, stage I = --stage1-tokens
    "hybrid": ("hybrid", ["--window", "32"], None),
    "hybrid-w16": ("hybrid", ["--window", "16"], None),
    "hybrid-w64": ("hybrid", ["--window", "64"], None),
    "hybrid-no-stage1": ("hybrid", ["--window", "32", "--stage", "2"], None),
    "hybrid-stage1-only": ("hybrid", ["--window", "32", "--stage", "1"], None),
    # xLSTM's input-gate init (bias ~0): the mLSTM normaliser's floor holds almost everywhere (docs/hybrid.md)
    "hybrid-igate0": ("hybrid", ["--window", "32", "--igate-bias", "0"], None),
    "hybrid-mlstm-only": ("hybrid", ["--branches", "mlstm"], None),
    "window-only": ("hybrid", ["--window", "32", "--branches", "window", "--stage", "2"], None),
    "hybrid-ce-only": ("hybrid", ["--window", "32", "--alpha", "0"], None),
    "hybrid-mlstm-rope": ("hybrid", ["--window", "32", "--mlstm-rope"], None),
    # knob: stage II trains only the mixers, at 10x the recipe's lr
    "hybrid-mixer-lr1e-4": ("hybrid", ["--window", "32", "--train", "mixer", "--lr", "1e-4"], None),
    # knobs: stage II end to end on the new parameters only (the teacher's stay exactly as copied), or all at 1e-4
    "hybrid-new-lr1e-3": ("hybrid", ["--window", "32", "--train", "new", "--lr", "1e-3"], None),
    "hybrid-lr1e-4": ("hybrid", ["--window", "32", "--lr", "1e-4"], None),
    # issue 24: the mixer variants (feature-map capacity = mLSTM state size; stage I on the attention weights; LoRA
    # stage II) and the quality / state frontier (windows 16..256, window-only against the hybrid, full layers)
    "hybrid-f64": ("hybrid", ["--window", "32", "--feature-dim", "64"], None),
    "hybrid-f32": ("hybrid", ["--window", "32", "--feature-dim", "32"], None),
    "hybrid-joint": ("hybrid", ["--window", "32", "--mix", "joint"], None),
    "hybrid-kv": ("hybrid", ["--window", "32", "--mlstm-heads", "kv"], None),
    "hybrid-kv-f64": ("hybrid", ["--window", "32", "--mlstm-heads", "kv", "--feature-dim", "64"], None),
    "hybrid-weights": ("hybrid", ["--window", "32", "--match-loss", "weights"], None),
    "hybrid-match-both": ("hybrid", ["--window", "32", "--match-loss", "both"], None),
    "hybrid-lora": ("hybrid", ["--window", "32", "--train", "lora"], None),
    "hybrid-w128": ("hybrid", ["--window", "128"], None),
    "hybrid-w256": ("hybrid", ["--window", "256"], None),
    "hybrid-full1": ("hybrid", ["--window", "32", "--full-attention-layers", "0"], None),
    "hybrid-full2": ("hybrid", ["--window", "32", "--full-attention-layers", "0,4"], None),
    **{f"window-only-w{w}": ("hybrid", ["--window", str(w), "--branches", "window", "--stage", "2"], None)
       for w in (16, 64, 128, 256)},
    # issue 33: make the mLSTM carry the long range (window dropout in stages I and II; with the joint mix)
    "hybrid-wd25": ("hybrid", ["--window", "32", "--window-dropout", "0.25"], None),
    "hybrid-wd50": ("hybrid", ["--window", "32", "--window-dropout", "0.5"], None),
    "hybrid-wd50-to0": ("hybrid", ["--window", "32", "--window-dropout", "0.5", "--window-dropout-final", "0"], None),
    **{f"hybrid-joint-w{w}": ("hybrid", ["--window", str(w), "--mix", "joint"], None) for w in (16, 64, 128)},
    # issue 33: stages I and II on books plus other kinds of text (MIX_ROWS train from the mixture's cache)
    "hybrid-mix": ("hybrid", ["--window", "32"], None),
    "hybrid-joint-mix": ("hybrid", ["--window", "32", "--mix", "joint"], None),
    "hybrid-wd25-mix": ("hybrid", ["--window", "32", "--window-dropout", "0.25"], None),
    # issue 32: the mLSTM kernel's compute dtype (ROW_ENV): bf16 forced, and fp32 (the default before bf16 inputs
    # computed in bf16; benchmarks/results/issue32-quality-h100 measured it against bf16 as "hybrid-kernel-bf16")
    "hybrid-kernel-bf16": ("hybrid", ["--window", "32"], None),
    "hybrid-kernel-fp32": ("hybrid", ["--window", "32"], None),
    # issue 33: more stage I (twice quality.py's --stage1-tokens default; a row's flag comes last, so it wins)
    "hybrid-joint-s1-5M": ("hybrid", ["--window", "32", "--mix", "joint", "--stage1-tokens", "5M"], None),
}
ROW_ENV = {"hybrid-kernel-bf16": {"TCACHE_MLSTM_KERNEL_DTYPE": "bf16"},
           "hybrid-kernel-fp32": {"TCACHE_MLSTM_KERNEL_DTYPE": "fp32"}}
"""Environment a row's distill, eval and probe run under (opt-in library switches that are not flags)."""
MIX_ROWS = {"hybrid-mix", "hybrid-joint-mix", "hybrid-wd25-mix"}
"""Rows distilled from the cache of --train mixed with --mix-data (benchmarks/data/train-mix.jsonl.xz, built by
benchmarks/mixture.py from Debian packages disjoint from the held-out sets) at --mix-weights."""
MIX_DATA = ROOT / "benchmarks" / "data" / "train-mix.jsonl.xz"
PROBE_DISTANCES = "16,64,256"
"""The recall probe's distances (`tcache probe`): W/2, 2W and 8W of the W = 32 rows."""
PRESETS = {
    # the mixer variants at W = 32 (one GPU call), and the quality / state frontier (another)
    "issue24-mixers": ["hybrid", "window-only", "hybrid-joint", "hybrid-f64", "hybrid-f32", "hybrid-kv",
                       "hybrid-kv-f64", "hybrid-weights", "hybrid-match-both", "hybrid-lora"],
    "issue24-frontier": ["hybrid-w16", "hybrid-w64", "hybrid-w128", "hybrid-w256", "hybrid-full1", "hybrid-full2",
                         "window-only-w16", "window-only-w64", "window-only-w128", "window-only-w256"],
}
PRESETS["issue24"] = PRESETS["issue24-mixers"] + PRESETS["issue24-frontier"]
# issue 33: the issue-24 presets did not fit one call with every held-out set and the 2048-token score (their run
# cut those for all but the first rows): halves that do, by the rows' count
for name in ("issue24-mixers", "issue24-frontier"):
    rows = PRESETS[name]
    PRESETS[f"{name}-a"], PRESETS[f"{name}-b"] = rows[:len(rows) // 2], rows[len(rows) // 2:]
PRESETS["issue33-levers"] = ["hybrid", "hybrid-joint", "hybrid-wd25", "hybrid-wd50", "window-only"]
PRESETS["issue33-joint-frontier"] = ["hybrid-joint-w16", "hybrid-joint", "hybrid-joint-w64", "hybrid-joint-w128"]
PRESETS["issue33-mixture"] = ["hybrid", "hybrid-joint", "hybrid-mix", "hybrid-joint-mix", "hybrid-wd25-mix"]
PRESETS["issue32-quality"] = ["hybrid", "hybrid-kernel-fp32", "v2", "v2-ce-only"]
PRESETS["issue33-stage1"] = ["hybrid-joint", "hybrid-joint-s1-5M", "hybrid-wd50-to0", "window-only"]
"""--runs NAME: a named list of rows (each also gets its window cut and the teacher)."""
DEFAULT_RUNS = ["v1", "v1-ce-only", "v2", "v2-ce-only", "scratch", "hybrid", "hybrid-w16", "hybrid-w64",
                "hybrid-no-stage1", "hybrid-stage1-only", "hybrid-igate0", "hybrid-mlstm-only", "window-only",
                "hybrid-ce-only", "hybrid-mlstm-rope",
                "hybrid-mixer-lr1e-4"]
HEAD_WINDOWS = 128  # also scored on VALID's first 128 windows of 512: the calibration used 128 windows
LONG = 2048  # every model is also scored on windows of this length (the shared teacher was trained at 512)
HELDOUT = sorted(str(p) for p in (ROOT / "benchmarks" / "data").glob("heldout-*.jsonl.xz"))
CUT_SINKS = 4  # tcache distill's --sinks default: no row passes --sinks, so every hybrid row has 4
DEFAULT_WINDOW = 32  # tcache distill's --window default, for hybrid rows that do not pass --window


def gap_closed(ppl: float, start: float, target: float) -> float | None:
    """Share of the log-perplexity gap from `start` to `target` that `ppl` closes: (ln start - ln ppl) /
    (ln start - ln target); None when start == target (no gap to close)."""
    gap = math.log(start) - math.log(target)
    return None if gap == 0 else (math.log(start) - math.log(ppl)) / gap


def recovery(ppl_student: float, ppl_cut: float, ppl_teacher: float) -> float | None:
    """Share of the window cut's log-perplexity loss that the student wins back: 0 = the untrained cut, 1 =
    the teacher, < 0 worse than the cut."""
    return gap_closed(ppl_student, ppl_cut, ppl_teacher)


def ratio_to_teacher(ppl: float, ppl_teacher: float) -> float:
    return ppl / ppl_teacher


def set_columns(ppl: dict[str, float], teacher: dict[str, float], cut: dict[str, float] | None) -> dict:
    """Per set of `ppl` (set -> perplexity): perplexity, x the teacher and, given the row's window cut, the
    recovery; a set the teacher (or the cut) lacks gets no ratio (no recovery)."""
    out = {}
    for name, p in ppl.items():
        col = {"perplexity": p}
        if name in teacher:
            col["vs_teacher"] = ratio_to_teacher(p, teacher[name])
            if cut is not None and name in cut:
                col["recovery"] = recovery(p, cut[name], teacher[name])
        out[name] = col
    return out


def set_name(path: str) -> str:
    """benchmarks/data/heldout-pydocs.jsonl.xz -> pydocs."""
    name = Path(path).name
    for ext in (".xz", ".jsonl"):
        name = name.removesuffix(ext)
    return name.removeprefix("heldout-")


def row_window(name: str) -> int | None:
    """The sliding window of a hybrid row, None for rows without one (xLSTM recipes, the mLSTM-only ablation)."""
    recipe, flags, _ = RUNS[name]
    if recipe != "hybrid" or flag_value(flags, "--branches", "both") == "mlstm":
        return None
    return int(flag_value(flags, "--window", DEFAULT_WINDOW))


def flag_value(flags: list[str], flag: str, default):
    """The value after `flag` in a row's distill flags, or `default` when the row does not pass it."""
    return flags[flags.index(flag) + 1] if flag in flags else default


def cut_name(window: int) -> str:
    return f"cut-w{window}"


def cut_windows(names: list[str]) -> list[int]:
    """The windows of the untrained cuts to score: one per window the hybrid rows in `names` use."""
    return sorted({w for n in names if n in RUNS and (w := row_window(n)) is not None})


def describe(name: str) -> tuple[str, list[str], str | None]:
    """(recipe, flags, baseline) of a row: a trained run of RUNS or an untrained window cut."""
    if name in RUNS:
        return RUNS[name]
    return "window-cut", ["--window", name.removeprefix("cut-w"), "--sinks", str(CUT_SINKS)], None


def heldout_sets(a) -> dict[str, str]:
    """set name -> path of the held-out sets to score."""
    return {set_name(p): p for p in a.heldout.split(",") if p}


def head_tokens(a) -> int:
    """VALID's first HEAD_WINDOWS windows of 512, or all of --eval-tokens when that is less (a smoke run)."""
    from tcache.units import parse_count

    return min(HEAD_WINDOWS * 512, parse_count(a.eval_tokens, "--eval-tokens"))

