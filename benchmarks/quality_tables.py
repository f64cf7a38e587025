"""quality.py's results from its work directory: quality.json (every row's perplexities, ratios, recovery, training
numbers) and quality.md's two tables."""

from __future__ import annotations

import json
from pathlib import Path

from harness.env import describe as measured_on
from harness.results import read_json_output, row, table, write_json
from quality_rows import CUT_SINKS, HEAD_WINDOWS, LONG, RUNS, cut_name, describe, gap_closed, head_tokens, \
    heldout_sets, ratio_to_teacher, row_window, set_columns


def write_results(out: Path, result: dict) -> None:
    write_json(out / "quality.json", result)
    text = tables(result)
    (out / "quality.md").write_text(text + "\n")
    print(text)


def load_if(path: Path) -> dict:
    return read_json_output(path) if path.exists() else {}


def set_evals(work: Path, name: str, sets: list[str]) -> dict[str, dict]:
    """set -> `tcache eval` result of `name` on VALID at 512 ("valid") and on each held-out set it finished."""
    files = {"valid": work / f"{name}.eval.json", **{s: work / f"{name}.eval.heldout-{s}.json" for s in sets}}
    return {s: read_json_output(f) for s, f in files.items() if f.exists()}


def collect(work: Path, names: list[str], a, build: dict, wall: float) -> dict:
    sets = list(heldout_sets(a))
    teacher = read_json_output(work / "teacher.eval.json")
    teacher_long = load_if(work / "teacher.eval.long.json")
    teacher_head = load_if(work / "teacher.eval.head.json")
    teacher_sets = set_evals(work, "teacher", sets)
    teacher_ppl = {s: e["perplexity"] for s, e in teacher_sets.items()}
    rows = {}
    for name in names:
        recipe, flags, _ = describe(name)
        d = work / name
        r = {"name": name, "recipe": recipe, "flags": flags, "finished": (work / f"{name}.eval.json").exists()}
        if recipe == "window-cut":
            r.update(window=int(flags[1]), sinks=CUT_SINKS, untrained=True)
        elif (d / "student.json").exists():
            s = json.loads((d / "student.json").read_text())
            r.update(tokens=s["trained"]["tokens"], steps=s["trained"]["steps"], train_s=s["trained"]["seconds"],
                     tokens_per_s=s["trained"]["tokens"] / max(s["trained"]["seconds"], 1e-9),
                     peak_gpu_gib=s.get("peak_gpu_memory_gib"), params=s["params"], kernels=s["kernels"],
                     final=s["final_metrics"])
        if (work / f"{name}.wall.json").exists():
            r.update(json.loads((work / f"{name}.wall.json").read_text()))
        if r["finished"]:
            e = read_json_output(work / f"{name}.eval.json")
            r.update(perplexity=e["perplexity"], eval_tokens=e["tokens_scored"],
                     vs_teacher=ratio_to_teacher(e["perplexity"], teacher["perplexity"]))
            if (work / f"{name}.eval.head.json").exists() and teacher_head:
                r["head_vs_teacher"] = ratio_to_teacher(
                    read_json_output(work / f"{name}.eval.head.json")["perplexity"], teacher_head["perplexity"])
            if (work / f"{name}.eval.long.json").exists():
                e = read_json_output(work / f"{name}.eval.long.json")
                r.update(perplexity_long=e["perplexity"], long_vs_own_512=e["perplexity"] / r["perplexity"])
        elif (d / "metrics.jsonl").exists():
            lines = (d / "metrics.jsonl").read_text().splitlines()
            r["last_metrics"] = json.loads(lines[-1]) if lines else None
        r["sets"] = {s: {"perplexity": e["perplexity"], "tokens_scored": e["tokens_scored"]}
                     for s, e in set_evals(work, name, sets).items()}
        if (work / f"{name}.probe.json").exists():
            r["recall"] = read_json_output(work / f"{name}.probe.json")["accuracy"]
        rows[name] = r
    for name, r in rows.items():
        base = rows.get(describe(name)[2] or "")
        if base and "perplexity" in r and "perplexity" in base:
            r["log_gap_closed"] = gap_closed(r["perplexity"], base["perplexity"], teacher["perplexity"])
            r["baseline"] = base["name"]
        # per set: x the teacher, and the recovery against the untrained cut with the row's window
        window = row_window(name) if name in RUNS else None
        cut = rows.get(cut_name(window)) if window is not None else None
        cut_ppl = {s: c["perplexity"] for s, c in cut["sets"].items()} if cut else None
        ppl = {s: c["perplexity"] for s, c in r["sets"].items()}
        for s, col in set_columns(ppl, teacher_ppl, cut_ppl).items():
            r["sets"][s].update(col)
        if cut is not None:
            r["cut"] = cut["name"]
    if "perplexity" in rows.get("v1", {}) and "perplexity" in rows.get("v1-online", {}):
        rows["v1-online"]["ppl_vs_cache"] = rows["v1-online"]["perplexity"] / rows["v1"]["perplexity"] - 1

    return {
        **measured_on(), "tokens_per_run": a.tokens_per_run, "lr": a.lr, "grad_accum": a.grad_accum,
        "build": build,
        "teacher": {"perplexity": teacher["perplexity"], "eval_tokens": teacher["tokens_scored"],
                    "params": teacher["params"], "perplexity_long": teacher_long.get("perplexity"),
                    "perplexity_head": teacher_head.get("perplexity"),
                    "sets": {s: {"perplexity": e["perplexity"], "tokens_scored": e["tokens_scored"]}
                             for s, e in teacher_sets.items()},
                    "recall": load_if(work / "teacher.probe.json").get("accuracy")},
        "long_seq_len": LONG, "stage1_tokens": a.stage1_tokens, "head_windows": head_tokens(a) // 512,
        "sets": {"valid": a.valid, **heldout_sets(a)}, "heldout_tokens": a.heldout_tokens,
        "recovery": "(ln ppl_cut - ln ppl) / (ln ppl_cut - ln ppl_teacher), cut = the untrained window cut "
                    "with the row's window (cut-wW)",
        "runs": rows, "total_wall_s": round(wall, 1),
    }


def main_table(result: dict) -> list[str]:
    teacher = result["teacher"]
    long = result.get("long_seq_len", LONG)
    head = result.get("head_windows", HEAD_WINDOWS)
    nan = float("nan")
    tl = teacher.get("perplexity_long") or nan
    lines = table(["model", "ppl @512", "x teacher", f"x teacher, first {head} windows", f"ppl @{long}",
                   f"@{long} / own @512", "log-gap closed (vs)", "tokens", "train s", "tok/s", "peak GiB"],
                  [["teacher", f"{teacher['perplexity']:.2f}", "1.000", "1.000", f"{tl:.2f}",
                    f"{tl / teacher['perplexity']:.3f}", "", "", "", "", ""]])
    for r in result["runs"].values():
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "unfinished"
        gap = f"{100 * r['log_gap_closed']:.1f}% ({r['baseline']})" if r.get("log_gap_closed") is not None else ""
        lines.append(row([r["name"], ppl, f"{r.get('vs_teacher', nan):.3f}", f"{r.get('head_vs_teacher', nan):.3f}",
                          f"{r.get('perplexity_long', nan):.2f}", f"{r.get('long_vs_own_512', nan):.3f}", gap,
                          f"{r.get('tokens', 0):,}", f"{r.get('train_s', 0):.0f}", f"{r.get('tokens_per_s', 0):,.0f}",
                          f"{r.get('peak_gpu_gib') or 0:.2f}"]))
    return lines


def sets_table(result: dict) -> list[str]:
    """Per set (VALID, then each held-out set): perplexity, x the teacher, recovery vs the row's window cut."""
    sets = list(result.get("sets", {"valid": None}))
    teacher = result["teacher"].get("sets", {})
    lines = table(["model", "cut", *(h for s in sets for h in (f"{s} ppl", "x teacher", "recovery"))],
                  [["teacher", "", *(c for s in sets for c in (fmt(teacher.get(s, {}).get("perplexity"), ".2f"),
                                                              "1.000", ""))]])
    for r in result["runs"].values():
        cols = []
        for s in sets:
            c = r.get("sets", {}).get(s, {})
            rec = "(cut)" if r["recipe"] == "window-cut" and c else fmt(c.get("recovery"), ".1f", 100, "%")
            cols += [fmt(c.get("perplexity"), ".2f"), fmt(c.get("vs_teacher"), ".3f"), rec]
        lines.append(row([r["name"], r.get("cut", ""), *cols]))
    return lines


def recall_table(result: dict) -> list[str]:
    """Per row: the recall probe's top-1 accuracy at each distance, and as a share of the teacher's."""
    teacher = result["teacher"].get("recall") or {}
    dists = list(teacher) or next((list(r["recall"]) for r in result["runs"].values() if r.get("recall")), [])
    if not dists:
        return []
    lines = table(["model", *(h for d in dists for h in (f"recall d={d}", "x teacher"))],
                  [["teacher", *(c for d in dists for c in (fmt(teacher.get(d), ".3f"), "1.000"))]])
    for r in result["runs"].values():
        got = r.get("recall") or {}
        cols = []
        for d in dists:
            share = got[d] / teacher[d] if d in got and teacher.get(d) else None
            cols += [fmt(got.get(d), ".3f"), fmt(share, ".3f")]
        lines.append(row([r["name"], *cols]))
    return lines


def fmt(x: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "" if x is None else f"{scale * x:{spec}}{unit}"


def tables(result: dict) -> str:
    recall = recall_table(result)
    return "\n".join(["", *main_table(result), "", *sets_table(result), *(["", *recall] if recall else [])])
