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


@click.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, help="Held-out text: a local file/directory or a HF dataset id.")
@click.option("--tokens", default="200k", show_default=True, help="Token budget, rounded down to whole windows.")
@click.option("--seq-len", default=512, show_default=True, help="Window length (each window scored alone).")
@click.option("--data-config", default=None)
@click.option("--split", default="train", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 GPU / fp32 CPU), fp32, fp16, bf16.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def eval_cmd(model, data, tokens, seq_len, data_config, split, text_field, batch_size, device, dtype, as_json) -> None:
    """Perplexity of MODEL (a `tcache distill` --out, or a HF causal LM) on the same windows for any model."""
    from tcache.student.eval import EvalConfig, perplexity
    from tcache.units import parse_count
    from tcache.text import DataSpec

    cfg = EvalConfig(model=model, data=DataSpec(data, data_config, split, text_field), tokens=parse_count(tokens),
                     seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype)
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
        click.echo(f"kernels: mLSTM {k['mlstm']}, sLSTM {k['slstm']} (trained at {r['trained_seq_len']} tokens)")


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
