"""`tcache plot`: the training curves of one or more distill runs, overlaid in one image (PNG unless --out names
.jpg, .pdf or .svg)."""

from __future__ import annotations

from pathlib import Path

import click

from tcache.cli.errors import friendly_errors
from tcache.errors import TcacheError


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False),
              help="Image to write, in the format its name asks for (.png, .jpg, .pdf or .svg); default with one "
                   "run: RUN/training.png (what distill writes).")
@friendly_errors
def plot(runs, out) -> None:
    """Plot every loss term, loss weight, learning rate and gradient norm of distill runs against tokens,
    from each RUN/metrics.jsonl; several runs are overlaid, named by their directories."""
    from tcache import locks, ownership, plots, pngs

    flag = "--out" if out is not None else None
    if out is None:
        if len(runs) > 1:
            raise TcacheError(f"{len(runs)} runs need one output file; pass --out FILE.png")
        out = Path(runs[0]) / plots.TRAINING_PNG
    # a distill run's own training.png is only ever tcache's (distill draws it): redrawn in place
    ours = flag is None and ownership.owner(Path(runs[0]))[0] == "run"
    # a run's own plot locks the run (its lock file beside it, not inside: a run lists what it holds)
    pngs.check_target(out, "--out", ours=ours)  # up front: before any metrics are read
    with locks.locked(out if flag else Path(runs[0]), "--out" if flag else "RUN"):
        pngs.check_target(out, "--out", ours=ours)  # again, now that no other tcache command writes it
        records = {name: plots.load_run(run) for name, run in zip(plots.run_names(runs), runs)}
        click.echo(f"wrote {plots.plot_runs(records, out, flag)}")
