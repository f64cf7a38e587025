"""`tcache eval`: perplexity of a student or a HF causal LM on held-out text."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click
from rich.console import Console
from rich.table import Table

from tcache.cli.errors import friendly_errors
from tcache.cli.options import config_from, config_options
from tcache.student.eval import EvalConfig


@click.command(name="eval")
@config_options(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def eval_cmd(as_json: bool, **options) -> None:
    """Perplexity of MODEL (a `tcache distill` --out, or a HF causal LM) on the same windows for any model."""
    from tcache.student.eval import perplexity

    cfg = config_from(EvalConfig, options)
    model = cfg.model
    # Kernel builds (xlstm's sLSTM via ninja) print to the process's stdout; --json keeps stdout pure JSON.
    with _stdout_to_stderr() if as_json else contextlib.nullcontext():
        r = perplexity(cfg)
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
