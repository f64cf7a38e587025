"""The quality / state frontier of the hybrid recipe (issue 24, item 4): each row's perplexity ratio to the teacher on
every held-out set against the bytes of its decode state per sequence at 32k tokens of context.

    python benchmarks/frontier.py --quality RESULTS/quality.json --teacher TEACHER_DIR --out RESULTS/frontier

State bytes are computed from the teacher's config (`state_bytes`); tests/test_frontier.py holds them equal to
what the static decode state of a real student allocates, and a full-attention layer's to transformers' own KV
cache. Per converted layer, per sequence:

    window + sinks   keys and values of W + S positions: 2 (W + S) Hkv d, in the model's dtype (allocated for the
                     mLSTM-only ablation too)
    mLSTM            C (H, 2d, d), n (H, 2d), m (H, 1), fp32 (the kernels' state dtype)
    full attention   keys and values of every position of the context: 2 T Hkv d, in the model's dtype
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quality_rows import flag_value

CONTEXT = 32 * 1024
"""The context at which states are compared (tokens): a full-attention layer's KV grows with it, the rest not."""


def state_bytes(config, window: int, sinks: int, branches: str = "hybrid", full_attention_layers: int = 0,
                context: int = CONTEXT, dtype_bytes: int = 2, batch: int = 1, feature_dim: int | None = None,
                mlstm_heads: str = "query") -> int:
    """Bytes of a hybrid student's decode state for `batch` sequences at `context` tokens; `config` is the
    teacher's transformers config (layers, heads, kv heads, head dim); feature_dim the mLSTM's q / k features
    (--feature-dim; default 2 x head dim), mlstm_heads its heads (--mlstm-heads: query or kv)."""
    layers, H = config.num_hidden_layers, config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    d = getattr(config, "head_dim", None) or config.hidden_size // H
    converted = layers - full_attention_layers
    # ring buffer + sinks, keys and values: the static decode state allocates them for every branch choice (the
    # mLSTM-only ablation keeps them too, unused)
    per_layer = 2 * (window + sinks) * Hkv * d * dtype_bytes
    if branches != "window":
        F = feature_dim or 2 * d
        Hm = Hkv if mlstm_heads == "kv" else H
        per_layer += Hm * (F * d + F + 1) * 4  # C (F, d), n (F,), m in fp32 per mLSTM head
    full = full_attention_layers * 2 * context * Hkv * d * dtype_bytes
    return batch * (converted * per_layer + full)


def points(quality: dict, config) -> list[dict]:
    """One point per hybrid row and window cut of a quality.json (benchmarks/quality.py: `runs`, each with its
    distill `flags` and `sets` -> {set: {vs_teacher}}): its state bytes and its ratio to the teacher per set. A row
    with --stage 1 only is left out (its stage II did not run)."""
    out = []
    for name, run in quality.get("runs", {}).items():
        flags = run.get("flags") or []
        if run.get("recipe", "hybrid") not in ("hybrid", "window-cut") or flag_value(flags, "--stage", None) == "1":
            continue
        cut = run.get("recipe") == "window-cut"
        window, sinks = int(flag_value(flags, "--window", "32")), int(flag_value(flags, "--sinks", "4"))
        branches = "window" if cut else flag_value(flags, "--branches", "both")
        full = len([x for x in (flag_value(flags, "--full-attention-layers", "") or "").split(",") if x.strip()])
        fdim = int(flag_value(flags, "--feature-dim", "0")) or None
        mheads = flag_value(flags, "--mlstm-heads", "query")
        out.append({"name": name, "window": window, "branches": branches, "full_attention_layers": full,
                    "trained": not cut, "x_teacher": {k: v.get("vs_teacher") for k, v in run.get("sets", {}).items()},
                    "feature_dim": fdim,
                    "state_bytes": state_bytes(config, window, sinks, "hybrid" if branches == "both" else branches,
                                               full, feature_dim=fdim, mlstm_heads=mheads)})
    return out


def plot(pts: list[dict], path: Path) -> None:
    """One panel per set: ratio to the teacher against state MiB (log), a line per (branches, full layers)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({s for p in pts for s in p["x_teacher"]})
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(4.5 * max(1, len(sets)), 3.6), squeeze=False)
    for ax, s in zip(axes[0], sets):
        groups: dict = {}
        for p in pts:
            if s in p["x_teacher"] and isinstance(p["x_teacher"][s], (int, float)):
                key = (p["branches"] if p["trained"] else "window cut, untrained", p["full_attention_layers"])
                groups.setdefault(key, []).append((p["state_bytes"] / 2**20, p["x_teacher"][s], p["window"]))
        for (branch, full), xs in sorted(groups.items()):
            xs.sort()
            ax.plot([x for x, _, _ in xs], [y for _, y, _ in xs], "o-", label=f"{branch}, {full} full layers")
            for x, y, w in xs:
                ax.annotate(f"W{w}", (x, y), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the minor labels overlap
        ax.set_xlabel("decode state per sequence at 32k (MiB)")
        ax.set_ylabel("perplexity / teacher's")
        ax.set_title(s)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", required=True, help="a quality.json of benchmarks/quality.py")
    ap.add_argument("--teacher", required=True, help="the teacher's directory (its config.json)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(a.teacher)
    pts = points(json.loads(Path(a.quality).read_text()), cfg)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps({"context": CONTEXT, "points": pts}, indent=1))
    plot(pts, out / "frontier.png")
    print(f"{len(pts)} points -> {out / 'frontier.json'}, {out / 'frontier.png'}")


if __name__ == "__main__":
    main()
