"""`tcache probe`: the recall probe (student/inference/probe.py) of a student, an export or a HF causal LM."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tcache.cli.errors import friendly_errors
from tcache.cli.options import config_from, config_options
from tcache.student.inference.probe import ProbeConfig


@click.command(name="probe")
@config_options(ProbeConfig)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def probe(as_json: bool, **options) -> None:
    """Recall of MODEL: top-1 accuracy copying a span of random tokens seen d tokens earlier, per distance d."""
    from tcache.student.inference.probe import run

    cfg = config_from(ProbeConfig, options)
    progress = Progress(TextColumn("[bold]probe"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=True)
    task = progress.add_task("probe", total=None)
    with progress:
        r = run(cfg, lambda done, total: progress.update(task, completed=done, total=total))
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    t = Table(title=f"recall of {cfg.model} (span {cfg.span}, {cfg.sequences} sequences each, chance "
                    f"{r['chance']:.1e})")
    t.add_column("distance")
    t.add_column("top-1 accuracy")
    for d, a in r["accuracy"].items():
        t.add_row(d, f"{a:.3f}")
    Console().print(t)
