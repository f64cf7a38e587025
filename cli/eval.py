"""`tcache eval`: perplexity of a student or a HF causal LM on held-out text."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from tcache.cli.errors import friendly_errors
from tcache.cli.format import human_count
from tcache.cli.options import config_from, config_options
from tcache.student.inference.eval import EvalConfig


class _TokensColumn(ProgressColumn):
    def render(self, task) -> Text:
        rate = task.finished_speed or task.speed
        return Text(f"{human_count(task.completed)}/{human_count(task.total or 0)} tok"
                    + (f" {human_count(rate)} tok/s" if rate else ""))


@click.command(name="eval")
@config_options(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def eval_cmd(as_json: bool, **options) -> None:
    """Perplexity of MODEL (a `tcache distill` --out, or a HF causal LM) on the same windows for any model."""
    from tcache.student.inference.eval import perplexity

    cfg = config_from(EvalConfig, options)
    model = cfg.model
    # Progress on stderr (transient: the table or JSON is what stays): windows scored, tokens/s and the ETA.
    progress = Progress(TextColumn("[bold]eval"), BarColumn(), _TokensColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                        speed_estimate_period=24 * 3600)
    task = progress.add_task("eval", total=None)

    def on_progress(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    # Kernel builds (xlstm's sLSTM via ninja) print to the process's stdout; --json keeps stdout pure JSON.
    with _stdout_to_stderr() if as_json else contextlib.nullcontext(), progress:
        r = perplexity(cfg, on_progress)
    from tcache import dist

    if not dist.is_main():  # under torchrun: every rank holds the result, rank 0 prints it
        return
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    t = Table(title=f"perplexity of {model}")
    for col in ("model", "kind", "perplexity", "tokens scored", "windows x seq_len", "params"):
        t.add_column(col)
    t.add_row(r["model"], r["kind"], f"{r['perplexity']:.3f}", f"{r['tokens_scored']:,}",
              f"{r['windows']} x {r['seq_len']}", f"{r['params']:,}")
    Console().print(t)
    if "kernels" in r:  # a tcache student: which kernel scored it, and at what length it was trained
        k = r["kernels"]
        names = {"mlstm": "mLSTM", "slstm": "sLSTM", "window": "window"}
        click.echo(f"kernels: {', '.join(f'{names.get(n, n)} {v}' for n, v in k.items())} "
                   f"(trained at {r['trained_seq_len']} tokens)")


@contextlib.contextmanager
def _stdout_to_stderr():
    """Point file descriptor 1 at stderr for the duration (subprocesses inherit it)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
