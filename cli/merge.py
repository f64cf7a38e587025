"""`tcache merge`: students of one teacher and one recipe shape combined in weight space into one run."""

from __future__ import annotations

import click
from rich.console import Console

from tcache.cli.errors import friendly_errors
from tcache.cli.options import config_from, config_options
from tcache.student.models.merge import MergeConfig


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@config_options(MergeConfig)
@friendly_errors
def merge(runs: tuple[str, ...], **options) -> None:
    """Merge RUNS (students distilled from one teacher with one recipe shape, e.g. domain experts) into one run at
    --out: each weight the weighted mean of theirs (Hauzenberger et al. 2026, Eq. 14). The result is a run that
    eval, export, generate and `distill --init` take; OUT/merge.json lists the runs, weights and caches."""
    from tcache.student.models.merge import merge_runs

    cfg = config_from(MergeConfig, options, runs=list(runs))
    manifest = merge_runs(cfg.runs, cfg.out, cfg.weights, cfg.overwrite)
    shown = ", ".join(f"{r['run']} x {r['weight']:g}" for r in manifest["runs"])
    console = Console(stderr=True)
    console.print(f"[green]merged[/]: {shown} -> {cfg.out}")
    if not manifest["same_init"]:
        seeds = ", ".join(str(r["seed"]) for r in manifest["runs"])
        console.print(f"[yellow]note[/]: the runs were distilled with different --seed ({seeds}), so their new mixer "
                      "weights did not start from one point; distill the experts with one --seed to merge as the paper")
