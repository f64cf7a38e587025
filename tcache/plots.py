"""PNG plots of what tcache writes: a run's training curves from its metrics.jsonl (one run, or several
overlaid) and a cache's value distributions. Drawn on matplotlib's Agg canvas, never pyplot: no display is
needed and no global figure state is touched inside a training process."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tcache.errors import TcacheError
from tcache import pngs
from tcache.outdir import STAGING_SUFFIX

METRICS_FILE = "metrics.jsonl"  # student/training/metrics.py writes it; the base cannot import the student side
TRAINING_PNG = "training.png"
# Panel titles: the loss terms in panel order (a term is drawn when some run logged it non-zero), then the rest.
LOSS_TERMS = ("loss", "ce", "kd", "align", "match")
WEIGHT_PANELS = ["weights", "temperature", "lr", "grad_norm"]
TITLES = {
    "loss": "total loss (the weighted mix)",
    "ce": "CE: next-token cross-entropy",
    "kd": "KD: KL to the teacher's top-k",
    "align": "alignment: hidden-state distance",
    "match": "match (stage 1): attention output error",
    "weights": "loss weights (CE gets 1 - alpha - beta)",
    "temperature": "KD temperature T",
    "lr": "learning rate",
    "grad_norm": "gradient norm, before clipping",
    "loss_scale": "fp16 loss scale",
}
UNITS = {"ce": "nats per token", "kd": "nats per token", "grad_norm": "L2 norm"}
SMOOTH_ABOVE = 20  # points; fewer are drawn as they are, more get a moving average over the faint raw line
MAX_PLOT_SHARE = 0.02  # of a run's time, at most, spent redrawing its figure at checkpoints
_drawn: dict[str, tuple[float, float]] = {}  # run directory -> (when its last draw ended, seconds it took)
MAX_POINTS = 4000  # per line, evenly thinned: more than a panel's ~400 px show, and long runs draw as fast


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a kill during a write) is skipped. distill writes ASCII
    JSON, so bytes that are not UTF-8 are not a torn line but a file that is not (or no longer) its own."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise TcacheError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    records = []
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            r = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise TcacheError(f"{path} line {n} is not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                              "distill writes ASCII JSON lines: remove that line, or plot another run") from None
        except ValueError:
            continue
        if isinstance(r, dict) and "tokens" in r:
            records.append(r)
    return records


def load_run(run: str | os.PathLike) -> list[dict]:
    """A run directory's metrics records, for `tcache plot`: a directory without any is an error."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise TcacheError(f"{run} has no {METRICS_FILE}; pass a run directory that `tcache distill --out` wrote")
    records = read_metrics(path)
    if not records:
        raise TcacheError(f"{path} holds no optimizer step yet; plot the run after its first step")
    return records


def run_names(runs: list[str | os.PathLike]) -> list[str]:
    """Legend names: each run directory's name, or the path as given where two names are the same."""
    names = [Path(r).resolve().name for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def panels(runs: dict[str, list[dict]]) -> list[str]:
    """The figure's panels: each loss term some run logged with a non-zero value, then the loss weights,
    temperature, learning rate, gradient norm, and fp16's loss scale when logged."""
    records = [r for recs in runs.values() for r in recs]
    terms = [t for t in LOSS_TERMS if any(r.get(t) for r in records)]
    return terms + WEIGHT_PANELS + (["loss_scale"] if any("loss_scale" in r for r in records) else [])


def stage_changes(recs: list[dict]) -> list[tuple[float, str]]:
    """(tokens at the end of a stage, the next stage's name) for each stage change of a run (the hybrid's)."""
    return [(prev["tokens"], r.get("stage")) for prev, r in zip(recs, recs[1:]) if r.get("stage") != prev.get("stage")]


def plot_runs(runs: dict[str, list[dict]], out: str | os.PathLike, flag: str | None = None) -> Path:
    """One figure of every run's curves against tokens: a panel per loss term present, the loss weights,
    temperature, learning rate, gradient norm (and fp16's loss scale when logged); one colour per run, stage
    boundaries dotted. Written atomically, so a viewer open on it never reads half a file; `flag`: the option
    that named `out` (its existing file is replaced only if tcache drew it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    keys = panels(runs)
    cols = min(4 if len(keys) <= 8 else 5, len(keys))  # two rows for up to ten panels
    rows = math.ceil(len(keys) / cols)
    top = 0.6  # inches for the title, or the runs' legend
    width, height = 4.3 * cols, 3.1 * rows + 0.75
    fig = Figure(figsize=(width, height), dpi=100)
    # fixed margins in inches: matplotlib's constrained layout measured every label and doubled the time to draw
    fig.subplots_adjust(left=0.62 / width, right=1 - 0.12 / width, bottom=0.5 / height, top=1 - top / height,
                        wspace=0.3, hspace=0.42)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    xmax = max(r["tokens"] for recs in runs.values() for r in recs) or 1
    for ax, key in zip(axes, keys):
        ax.set_title(TITLES[key], fontsize=10)
        ax.set_xlabel("tokens trained")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
        ax.grid(alpha=0.3)
        for (name, recs), color in zip(runs.items(), colors):
            if key == "weights":
                for w, style in (("alpha", "-"), ("beta", "--")):
                    _line(ax, recs, w, color, style, smooth=False, weights_only=True)
            else:
                _line(ax, recs, key, color, "-", smooth=key in LOSS_TERMS or key == "grad_norm",
                      weights_only=key == "temperature")
            _stage_marks(ax, recs, color, label=ax is axes[0])
        ax.set_xlim(0, 1.03 * xmax)  # one token axis for all panels, whichever stages logged the key
        if key == "lr":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        if key in LOSS_TERMS or key in ("lr", "grad_norm", "loss_scale"):
            _log_if_wide(ax)  # the hybrid's stages differ 10-1000x in loss and learning rate
        if key in UNITS:
            ax.set_ylabel(UNITS[key])
        if key == "weights":
            ax.set_ylim(-0.03, 1.03)
            ax.legend(handles=[Line2D([], [], color="0.35", ls="-", label="alpha (KD)"),
                               Line2D([], [], color="0.35", ls="--", label="beta (alignment)")], fontsize=8)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if len(runs) == 1:
        name, recs = next(iter(runs.items()))
        fig.suptitle(f"{name}: {len(recs):,} steps, {_count(recs[-1]['tokens'])} tokens", fontsize=12)
    else:  # the runs' legend is the title
        fig.legend(handles=[Line2D([], [], color=c, lw=2, label=n) for n, c in zip(runs, colors)],
                   loc="upper center", ncols=min(len(runs), 4), fontsize=10, frameon=False)
    return pngs.save(fig, FigureCanvasAgg, out, flag)


def plot_run_dir(run: str | os.PathLike) -> Path | None:
    """RUN/training.png from RUN/metrics.jsonl (distill calls this at each checkpoint and at the end);
    None before the first step."""
    path = Path(run) / METRICS_FILE
    records = read_metrics(path) if path.is_file() else []
    if not records:
        return None
    name = Path(run).resolve().name
    if name.startswith(".") and name.endswith(STAGING_SUFFIX):  # an --overwrite run trains beside its --out
        name = name[1:-len(STAGING_SUFFIX)]
    return plot_runs({name: records}, Path(run) / TRAINING_PNG)


def plot_cache(stats: dict, out: str | os.PathLike, flag: str | None = None) -> Path:
    """A cache's value distributions from `cache_stats(..., keep_samples=True)`: the teacher's top-k
    probability mass per token, and per hidden group its values and its per-token RMS (`flag` as for plot_runs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    v = stats["samples"]
    groups = [f"group {g}: layers {a + 1}-{b}" for g, (a, b) in enumerate(stats["layer_groups"])]
    has_hidden = v["hidden_values"].size > 0
    fig = Figure(figsize=(14 if has_hidden else 5.5, 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3 if has_hidden else 1, squeeze=False).ravel()
    mass = v["topk_mass"]
    ax = axes[0]
    ax.hist(mass, bins=np.linspace(0, 1, 51), color="C0")
    for q, style in ((stats["topk_mass"]["mean"], "-"), (stats["topk_mass"]["p5"], "--")):
        if q is not None:
            ax.axvline(q, color="k", ls=style, lw=1)
    ax.set_yscale("log")
    ax.set(title=f"teacher probability in its top-{stats['top_k']}", xlabel="probability mass (per token)",
           ylabel="tokens", xlim=(0, 1))
    if mass.size:
        ax.legend(handles=ax.get_lines(), labels=[f"mean {mass.mean():.3f}", f"p5 {np.percentile(mass, 5):.3f}"],
                  fontsize=8, loc="upper left")
    if has_hidden:
        ax = axes[1]
        edges = _edges(v["hidden_values"], 200)  # one set for all groups, so their histograms compare
        for g, (values, name) in enumerate(zip(v["hidden_values"], groups)):
            ax.hist(values, bins=edges, histtype="step", color=f"C{g}", label=name)
        ax.set_yscale("log")
        ax.set(title="hidden-state values (a sample of each row's)", xlabel="value", ylabel="sampled values")
        ax.legend(fontsize=8)
        ax = axes[2]
        rms = v["token_rms"]
        wide = rms.min() > 0 and rms.max() / rms.min() > 20
        bins = np.geomspace(rms.min(), rms.max(), 81) if wide else _edges(rms, 80)
        for g, (r, name) in enumerate(zip(rms, groups)):
            ax.hist(r, bins=bins, histtype="step", color=f"C{g}", label=name)
        if wide:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(title=f"hidden-state RMS per token (over D = {stats['hidden_size']})", xlabel="RMS",
               ylabel="tokens")
        ax.legend(fontsize=8)
    teacher = stats["teacher"].get("name_or_path") or "?"
    rows = stats["topk_mass"]["rows_sampled"]
    fig.suptitle(f"{stats['cache']} (teacher {teacher}): {mass.size:,} tokens of {rows} sampled rows", fontsize=11)
    return pngs.save(fig, FigureCanvasAgg, out, flag)


def training_plot(run: str | os.PathLike, warn: Callable[[str], None], final: bool = False) -> None:
    """plot_run_dir for the training loop. A plot never stops a run: any failure is a warning. Nor does it
    slow one: a checkpoint redraws only once the last draw's time is at most MAX_PLOT_SHARE of the time since
    it ended (a draw takes ~1 s on a 2-core CPU, and a GPU run may checkpoint every few seconds); the final
    draw always happens."""
    key, now = str(Path(run).resolve()), time.perf_counter()
    last = _drawn.get(key)
    if not final and last is not None and now - last[0] < last[1] / MAX_PLOT_SHARE:
        return
    try:
        plot_run_dir(run)
    except Exception as e:  # any failure: a figure is never worth a run
        warn(f"could not draw {Path(run) / TRAINING_PNG} ({type(e).__name__}: {e}); the run is unaffected, "
             f"`tcache plot {run}` draws it later")
    end = time.perf_counter()
    _drawn[key] = (end, end - now)


def _segments(recs: list[dict], key: str, weights_only: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, values) per stage of the steps that logged `key` with a finite value, the loss weights only
    where the mix uses them (not in a matching stage): stages are drawn and smoothed apart, never joined."""
    out = []
    for _, stage in itertools.groupby(recs, key=lambda r: r.get("stage")):
        pts = [(r["tokens"], r[key]) for r in stage if isinstance(r.get(key), (int, float))
               and math.isfinite(r[key]) and not (weights_only and "match" in r)]
        if pts:
            out.append(tuple(np.array(pts, dtype=np.float64).T))
    return out


def _line(ax, recs, key, color, style, smooth: bool, weights_only: bool = False) -> None:
    segments = _segments(recs, key, weights_only)
    if key in LOSS_TERMS and not any(y.any() for _, y in segments):
        return  # a term this run does not have (the hybrid's all-zero alignment)
    for x, y in segments:
        if smooth and x.size > SMOOTH_ABOVE:
            ax.plot(*_thin(x, y), color=color, ls=style, lw=0.8, alpha=0.3)
            ax.plot(*_thin(x, _moving_average(y, max(3, x.size // 25))), color=color, ls=style, lw=1.6)
        else:
            ax.plot(*_thin(x, y), color=color, ls=style, lw=1.4, marker="." if x.size <= SMOOTH_ABOVE else None)


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over `window` steps, shrinking at both ends, so the curve neither lags nor starts late."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(y.size)
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + window // 2 + 1, y.size)
    return (c[hi] - c[lo]) / (hi - lo)


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= MAX_POINTS:
        return x, y
    keep = np.linspace(0, x.size - 1, MAX_POINTS).round().astype(int)
    return x[keep], y[keep]


def _stage_marks(ax, recs: list[dict], color: str, label: bool) -> None:
    """A dotted line where a run's stage changes (the hybrid's stage I -> II), named in the first panel."""
    for tokens, stage in stage_changes(recs):
        ax.axvline(tokens, color=color, ls=":", lw=1.2)
        if label:
            ax.text(tokens, 0.02, f" stage {stage}", transform=ax.get_xaxis_transform(), ha="left", va="bottom",
                    fontsize=8, color=color)


def _log_if_wide(ax) -> None:
    """Log y where the drawn values span more than 20x (losses of a stage change, early steps)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ys = np.concatenate([line.get_ydata() for line in ax.get_lines() if line.get_linestyle() != ":"] or [[]])
    if ys.size and ys.min() > 0 and ys.max() / ys.min() > 20:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        if ys.max() / ys.min() < 1e3:  # few decades: label 2x and 5x too, or the axis may show one number
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _count(v: float) -> str:
    """Tick labels as token budgets are written: 0, 500, 20k, 1.5M, 2G."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def _edges(values: np.ndarray, n: int) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return np.linspace(lo, hi if hi > lo else lo + 1.0, n + 1)  # constant values (a synthetic cache): one bin
