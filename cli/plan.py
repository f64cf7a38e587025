"""`tcache plan`: disk and time a build will need, from the build's own options and a short measured run."""

from __future__ import annotations

import functools
import json

import click
from rich.console import Console
from rich.table import Table

from tcache.cli.build import BUILD_ONLY, build_options
from tcache.cli.options import config_from
from tcache.cli.format import human_bytes, human_count
from tcache.cli.errors import friendly_errors
from tcache.errors import TcacheError
from tcache.teachercache.config import BuildConfig


@click.command()
@functools.partial(build_options, skip=BUILD_ONLY + ("out",))
@click.option("--out", "out", default="cache", show_default=True, type=click.Path(),
              help="Where the cache would go (nothing is written there): its filesystem's free space is checked, "
                   "and the short timed run writes a temporary sample beside it, removed at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def plan(as_json: bool, out: str, **options) -> None:
    """Before a build: exact bytes per token by field, disk needed, and an estimated time measured here."""
    from tcache.teachercache.plan import plan as run_plan

    p = run_plan(config_from(BuildConfig, options, out=out))
    if as_json:
        click.echo(json.dumps(p, indent=2))
        _refuse_if_no_room(p)
        return
    t = Table(title=f"plan: {p['tokens']:,} tokens of {p['teacher']} ({p['device']}, {p['dtype']}, batch {p['batch_size']})")
    t.add_column("field")
    t.add_column("dtype")
    t.add_column("B/token", justify="right")
    t.add_column("bytes", justify="right")
    for name, f in p["fields"].items():
        t.add_row(name, f["dtype"], f"{f['bytes_per_token']:.1f}", human_bytes(f["bytes_per_token"] * p["tokens"]))
    # the whole teacher is stored once: the hybrid recipe starts from all of it
    t.add_row("teacher/ (full weights, embedding and head)", "", "", human_bytes(p["teacher_files_bytes"]))
    t.add_row("[bold]total", "", f"[bold]{p['bytes_per_token']:.1f}", f"[bold]{human_bytes(p['total_bytes'])}")
    console = Console()
    console.print(t)
    m = p["measured"]
    teacher_rate = f"{human_count(m['teacher_tokens_per_s'])} tok/s" if m["teacher_tokens_per_s"] else "n/a"
    console.print(
        f"measured on {human_count(m['tokens'])} tokens: teacher {teacher_rate}, disk "
        f"{human_bytes(m['disk_bytes_per_s'])}/s = {human_count(m['disk_tokens_per_s'])} tok/s at these fields\n"
        f"estimated build time: {p['estimated_seconds'] / 60:.1f} min ({p['bound_by']}-bound)"
    )
    console.print(f"disk: needs {human_bytes(p['disk_needed_bytes'])} (with HDF5 overhead), "
                  f"{human_bytes(p['disk_free_bytes'])} free at --out")
    _refuse_if_no_room(p)


def _refuse_if_no_room(p: dict) -> None:
    if not p["fits"]:
        raise TcacheError(f"this build needs {human_bytes(p['disk_needed_bytes'])} but the filesystem at --out has "
                          f"{human_bytes(p['disk_free_bytes'])} free; free space, lower --tokens, or choose another --out")
