"""speed.py's outputs from its speed.json: the ratios to the teacher, speed.md's tables and speed.png's plot."""

from __future__ import annotations

from pathlib import Path

from harness.results import fmt, is_number, row, table
from speed_models import ROWS, count, is_teacher, label


def ratio(v, ref) -> float | None:
    return v / ref if is_number(v) and is_number(ref) and ref > 0 else None


def add_ratios(doc: dict) -> None:
    """x_teacher_static_b{B}: decode tokens/s over teacher-static's at the same cell; x_teacher_prefill: prefill
    tokens/s over the teacher's forward (teacher-eager's; the same forward as teacher-static's)."""
    rows = doc["rows"]
    ref = rows.get("teacher-static", {})
    pre = (rows.get("teacher-eager") or rows.get("teacher-static") or {}).get("prefill_tok_s", {})
    for r in rows.values():
        for B in doc["batches"]:
            theirs = ref.get(f"decode_tok_s_b{B}", {})
            r[f"x_teacher_static_b{B}"] = {c: ratio(v, theirs.get(c)) for c, v in r.get(f"decode_tok_s_b{B}", {}).items()}
        r["x_teacher_prefill"] = {c: ratio(v, pre.get(c)) for c, v in r.get("prefill_tok_s", {}).items()}


def short(v) -> str:
    text = str(v).replace("|", "/")
    return text if len(text) <= 48 else text[:45] + "..."


def num(v, spec: str) -> str:
    return format(v, spec) if is_number(v) else "-"


def all_contexts(doc: dict) -> list[str]:
    labels = {c for r in doc["rows"].values() for k, v in r.items()
              if k.startswith("decode_tok_s_b") or k == "prefill_tok_s" for c in v}
    return sorted(labels, key=count)


def env_text(env: dict | None) -> str:
    """A row's decode variables as set in its process (speed.json's `env`), e.g. TCACHE_CUDA_GRAPH=0."""
    return " ".join(f"{k}={v}" for k, v in (env or {}).items() if v is not None) or "-"


def method_text(doc: dict) -> str:
    """How the decode cells were timed, as speed.md's header says it."""
    eager = doc.get("eager_steps", doc["steps"])
    if "method" not in doc:  # before issue 36
        return (f"each decode cell is one greedy generate() of {doc['new_tokens']} tokens after a warm-up, every token "
                f"stamped by a logits processor: tokens/s = batch x {doc['steps']} / the time of the {doc['steps']} "
                f"forwards after the first token (the prefill excluded; teacher-eager: {eager} forwards).")
    return (f"each decode cell is timed end to end: tokens/s = batch x N / (t(generate 1 + N new tokens) - "
            f"t(generate 1)), N = {doc['steps']} (teacher-eager: {eager}), greedy, all-ones attention mask, no hook "
            f"in the calls, synchronised around each whole call only; up to {doc.get('reps', 1)} pairs and each "
            f"call's median where the prefill is short. Kernels per step from a separately profiled pair "
            f"({doc.get('profile_steps')} steps).")


def profile_text(p) -> str:
    """A row's decode_profile in the Rows table: kernels (CUDA) or aten ops (CPU) per generated token, at its cell."""
    if not isinstance(p, dict):
        return short(p) if p else "-"
    where = f"b{p['batch']} {label(p['context'])}"
    if p.get("kernels_per_step") is not None:
        return f"{p['kernels_per_step']:.0f} kernels, {fmt(p['kernel_us_per_step'])} us ({where})"
    return f"{fmt(p.get('cpu_ops_per_step'))} CPU ops ({where})"


def markdown(doc: dict) -> str:
    rows = [r for r in ROWS if r in doc["rows"]]
    ctx = all_contexts(doc)
    head = table(["row", *ctx])
    bw = next((r["copy_gbps"] for r in doc["rows"].values() if r.get("copy_gbps")), None)
    lines = [f"# Inference speed: {doc['shape']}, {doc['dtype']}, {doc['device']}", "", f"`{doc['command']}`", "",
             f"torch {doc['torch']}, transformers {doc['transformers']}; {method_text(doc)} Copy bandwidth "
             f"{fmt(bw)} GB/s. Empty: not planned for that row; `not run`: out of its time share."]

    def cell(r, key, c):
        v = doc["rows"][r].get(key, {}).get(c)
        return "" if v is None and c not in doc["rows"][r].get(key, {}) else (short(v) if isinstance(v, str) else v)

    def with_ratio(r, key, x_key, c) -> str:
        """A rate cell: the number and its ratio, or the cell's failure / not-run text."""
        v, x = cell(r, key, c), doc["rows"][r].get(x_key, {}).get(c)
        return v if isinstance(v, str) else fmt(v) + (f" ({x:.2f}x)" if x is not None else "")

    end_to_end = "method" in doc  # files before issue 36 had per-token clocks: a median step, no prefill ratio

    def step_cell(r, B, c) -> str:
        v = cell(r, f"step_ms_b{B}" if end_to_end else f"step_ms_median_b{B}", c)
        if isinstance(v, str):
            return v
        get = lambda k: doc["rows"][r].get(f"{k}_b{B}", {}).get(c)  # noqa: E731
        state = get("state_bytes")
        text = (f"{num(v, '.3f')} / {fmt(state / 2**20 if state is not None else None)} / "
                f"{num(get('peak_gib'), '.2f')} / {fmt(get('gbps'))} ({num(get('bw_frac'), '.1%')})")
        return text + (f" / {fmt(get('prefill_over_decode'))}" if end_to_end else "")

    for B in doc["batches"]:
        lines += ["", f"## Decode tokens/s, batch {B} (x teacher-static)", "", *head]
        lines += [row([r, *(with_ratio(r, f"decode_tok_s_b{B}", f"x_teacher_static_b{B}", c) for c in ctx)])
                  for r in rows]
        what = ("step ms / state MiB / peak GiB / achieved GB/s (fraction of copy bandwidth) / prefill over decode "
                "(the subtracted t(1) over the decode left)" if end_to_end else
                "median step ms / state MiB / peak GiB / achieved GB/s (fraction of copy bandwidth)")
        lines += ["", f"Batch {B}: {what}", "", *head, *(row([r, *(step_cell(r, B, c) for c in ctx)]) for r in rows)]
    lines += ["", "## Prefill tokens/s, batch 1 (x the teacher's forward)", "", *head]
    lines += [row([r, *(with_ratio(r, "prefill_tok_s", "x_teacher_prefill", c) for c in ctx)]) for r in rows]
    lines += ["", "## Rows", "", *table(["row", "status", "seconds (share)", "compiles (teacher) / CUDA-graph captures "
                                         "(students): warm-up, timed", "kernels per step (profiled cell)", "kernels",
                                         "decode env"])]
    for r in rows:
        d = doc["rows"][r]
        g = d.get("recompiles") if is_teacher(r) else d.get("captures")
        graphs = "-" if not g else f"{g['warmup']}, {g['timed']}" + (f" ({g['retries']} retried)" if g["retries"] else "")
        share = "-" if d.get("limit_s") is None else f"{d['limit_s']:.0f}"
        lines.append(row([r, short(d.get("status")), f"{num(d.get('wall_s'), '.0f')} ({share})", graphs,
                          profile_text(d.get("decode_profile")), d.get("kernels") or "-", env_text(d.get("env"))]))
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Decode tokens/s and the generation state's memory against the context, one line per row, at batch 8 (or the
    largest batch below it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (python benchmarks/speed.py --replot DIR/speed.json draws it later)")
        return
    B = 8 if 8 in doc["batches"] else max([b for b in doc["batches"] if b <= 8] or doc["batches"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in [r for r in ROWS if r in doc["rows"]]:
        d = doc["rows"][r]
        style = "--" if r.endswith("-eager") else "-"
        for ax, key, scale in ((ax1, "decode_tok_s", 1), (ax2, "state_bytes", 2**-20)):
            pts = sorted((count(c), v * scale) for c, v in d.get(f"{key}_b{B}", {}).items()
                         if isinstance(v, (int, float)))
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=r)
    for ax, title, unit in ((ax1, f"decode throughput, batch {B}", "tokens / s"),
                            (ax2, f"generation state (KV cache / recurrent), batch {B}", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{doc['shape']}, {doc['dtype']}, {doc['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

