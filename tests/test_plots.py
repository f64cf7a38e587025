"""Plots: RUN/training.png from metrics.jsonl (xLSTM and hybrid runs, missing terms, a torn line), `tcache plot`
overlaying runs and refusing a directory without metrics, `tcache stats --plot`, and distill drawing the
figure at each checkpoint and at the end."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from tcache import plots, pngs
from tcache.cli.main import main
from tcache.student.training.metrics import METRICS_FILE
from test_cli_build import assert_clean_error

WEIGHTS = ["weights", "temperature", "lr", "grad_norm"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def write_run(run_dir: Path, steps: int = 60, hybrid: bool = False, torn: bool = False, **extra) -> Path:
    """A metrics.jsonl as distill writes it: xLSTM terms, or the hybrid's stage 1 (match) then 2 (ce, kd, a zero
    align: the hybrid has no alignment term)."""
    run_dir.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        r = {"step": s, "epoch": 0, "tokens": 2048 * s, "alpha": 0.8 - 0.002 * s, "beta": 0.1, "temperature": 2.0,
             "lr": 1e-3 * min(1.0, s / 10), "tokens_per_s": 900.0, "elapsed_s": 2.0 * s, "grad_norm": 5.0 / s,
             **extra}
        if hybrid and s <= steps // 2:
            r.update(stage="1", match=1e-1 / s, loss=1e-1 / s)
        else:
            r.update(stage="2" if hybrid else "distill", ce=9.0 / s ** 0.3, kd=3.0 / s ** 0.3,
                     align=0.0 if hybrid else 2.0, loss=6.0 / s ** 0.3)
        lines.append(json.dumps(r))
    text = "\n".join(lines) + "\n" + ('{"step": 61, "tok' if torn else "")
    (run_dir / METRICS_FILE).write_text(text)
    return run_dir


def test_training_plot_shows_the_terms_each_run_logged(tmp_path):
    assert plots.METRICS_FILE == METRICS_FILE  # the base names the file the student side writes
    xlstm, hybrid = write_run(tmp_path / "v1", torn=True), write_run(tmp_path / "hy", hybrid=True)
    assert plots.panels({"v1": plots.load_run(xlstm)}) == ["loss", "ce", "kd", "align", *WEIGHTS]
    # the hybrid: stage I's match, stage II's CE and KD, no all-zero alignment panel
    assert plots.panels({"hy": plots.load_run(hybrid)}) == ["loss", "ce", "kd", "match", *WEIGHTS]
    assert len(plots.load_run(xlstm)) == 60  # the torn last line is skipped
    for d in (xlstm, hybrid):
        out = plots.plot_run_dir(d)
        assert out == d / "training.png" and png_size(out) == (1720, 695)
        assert not list(d.glob("*.partial"))
    assert plots.stage_changes(plots.load_run(hybrid)) == [(30 * 2048, "2")]


def test_training_plot_of_a_sparse_run_and_before_the_first_step(tmp_path):
    """Only tokens and loss logged (no weights, lr or grad norm), an fp16 run's loss scale: no crash."""
    d = tmp_path / "sparse"
    d.mkdir()
    (d / METRICS_FILE).write_text("".join(json.dumps({"step": s, "tokens": 100 * s, "loss": 1.0 / s,
                                                      "loss_scale": 65536.0}) + "\n" for s in (1, 2, 3)))
    assert plots.panels({"sparse": plots.load_run(d)}) == ["loss", *WEIGHTS, "loss_scale"]
    assert png_size(plots.plot_run_dir(d))[0] == 1720
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / METRICS_FILE).write_text("")
    assert plots.plot_run_dir(empty) is None and not (empty / "training.png").exists()


def test_a_failed_plot_is_a_warning_not_a_crash(tmp_path):
    d = write_run(tmp_path / "r", steps=3)
    (d / "training.png").mkdir()  # the figure cannot replace a directory
    warnings = []
    plots.training_plot(d, warnings.append)
    assert len(warnings) == 1 and "training.png" in warnings[0] and "tcache plot" in warnings[0], warnings


def test_checkpoint_redraws_are_throttled_the_final_one_is_not(tmp_path):
    d = write_run(tmp_path / "r", steps=3)
    plots.training_plot(d, print)
    (d / "training.png").unlink()
    plots.training_plot(d, print)  # a checkpoint right after a draw: skipped, the run goes on
    assert not (d / "training.png").exists()
    plots.training_plot(d, print, final=True)
    assert png_size(d / "training.png") == (1720, 695)


def test_cli_plot_overlays_runs_and_refuses_a_directory_without_metrics(tmp_path):
    a, b = write_run(tmp_path / "distilled"), write_run(tmp_path / "ce-only", steps=40)
    r = run("plot", a, b, "--out", tmp_path / "both.png")
    assert r.exit_code == 0, r.output
    w, h = png_size(tmp_path / "both.png")
    assert (w, h) == (1720, 695)
    r = run("plot", a)  # one run: its own training.png
    assert r.exit_code == 0 and png_size(a / "training.png") == (1720, 695), r.output
    assert_clean_error(run("plot", a, tmp_path / "nope", "--out", tmp_path / "x.png"), "nope", "metrics.jsonl")
    assert_clean_error(run("plot", a, b), "--out")
    assert not (tmp_path / "x.png").exists()


def test_stats_plot(tmp_path, shared_cache):
    out = tmp_path / "cache.png"
    r = run("stats", shared_cache, "--sample-rows", 4, "--plot", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["topk_mass"]["rows_sampled"] == 4  # the JSON is unchanged by --plot
    assert png_size(out) == (1400, 420)
    from tcache.teachercache.stats import cache_stats

    s = cache_stats(shared_cache, max_rows=4, keep_samples=True)
    v = s["samples"]
    assert v["topk_mass"].shape == (4 * 128,) and v["token_rms"].shape == (1, 4 * 128)
    assert v["hidden_values"].shape == (1, 4 * 4096)
    # a cache without hidden states (--hidden-groups 0): the top-k panel alone
    s.update(layer_groups=[], samples={**v, "token_rms": v["token_rms"][:0], "hidden_values": v["hidden_values"][:0]})
    assert png_size(plots.plot_cache(s, tmp_path / "no-hidden.png")) == (550, 420)


def test_distill_draws_the_plot_at_each_checkpoint_and_at_the_end(tmp_path, shared_cache, monkeypatch):
    import tcache.student.training.train as train
    from tcache.student.training.config import DistillConfig

    calls = []
    real = plots.training_plot

    def counting(run_dir, warn, final=False):
        (run_dir / "training.png").unlink(missing_ok=True)
        real(run_dir, warn, final=final)
        assert png_size(run_dir / "training.png") == (1720, 695)  # drawn now, from the metrics of every step so far
        calls.append((len(plots.load_run(run_dir)), final))

    monkeypatch.setattr(train, "training_plot", counting)  # the loop's, at each checkpoint
    monkeypatch.setattr(plots, "training_plot", counting)  # checkpoint.save_run's, with the finished student
    out = tmp_path / "s"
    train.distill(DistillConfig(cache=str(shared_cache), out=str(out), steps=2, batch_size=2, grad_accum=1,
                                blocks=2, ckpt_every=1, device="cpu", seed=0))
    assert calls == [(1, False), (2, True)]
    assert png_size(out / "training.png") == (1720, 695)  # swapped in with the student


def test_plots_are_signed_and_only_a_plot_tcache_drew_is_replaced(tmp_path):
    """Every PNG tcache draws carries its Software text chunk; a target the user named is replaced only when it
    carries it, checked again after drawing (a file that appeared meanwhile is the user's), no .partial left."""
    from PIL import Image

    from tcache.errors import TcacheError

    d = write_run(tmp_path / "r", steps=3)
    png = plots.plot_run_dir(d)
    with Image.open(png) as im:
        assert im.text["Software"] == pngs.SOFTWARE == f"tcache {__import__('tcache').__version__}"
    assert pngs.written_by_tcache(png)
    records = {"r": plots.load_run(d)}
    assert plots.plot_runs(records, tmp_path / "mine.png", flag="--out") == tmp_path / "mine.png"  # a new file
    Image.new("RGB", (2, 2)).save(tmp_path / "user.png")
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("user.png", "notes.png"):
        before = (tmp_path / name).read_bytes()
        assert not pngs.written_by_tcache(tmp_path / name)
        with pytest.raises(TcacheError, match=f"--out {tmp_path / name} exists and was not written by tcache"):
            plots.plot_runs(records, tmp_path / name, flag="--out")
        assert (tmp_path / name).read_bytes() == before
    assert not list(tmp_path.glob("*.partial"))
    plots.plot_runs(records, tmp_path / "user.png")  # no flag: a run's own training.png, drawn in place
    assert pngs.written_by_tcache(tmp_path / "user.png")
