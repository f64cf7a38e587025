"""`tcache verify`: check a cache's bytes and values against its manifest, as a table or JSON."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tcache.cli.format import human_bytes
from tcache.cli.errors import friendly_errors
from tcache.errors import TcacheError


def failure_line(report: dict) -> str:
    """The one-line error of a failed verification: every bad shard and teacher file, with its problems."""
    bad = [f"{x['file']} ({', '.join(x['problems'])})" for x in report["shards"] + report["teacher_files"]
           if not x["ok"]]
    what = f"{report['shards_bad']} of {report['shards_total']} shards"
    if report["manifest_problems"]:  # first: what the manifest says frames every file's report
        bad.insert(0, f"manifest.json ({', '.join(report['manifest_problems'])})")
        what = f"manifest.json and {what}"
    if report["teacher_files_bad"]:
        what += f" and {report['teacher_files_bad']} of {report['teacher_files_total']} teacher files"
    # build --resume only continues an unfinished build: a finished cache with a bad shard is rebuilt
    return (f"{what} failed verification: {', '.join(bad)}; rebuild the cache "
            "(`tcache build` with its options and --overwrite)")


@click.command()
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@friendly_errors
def verify(cache, as_json) -> None:
    """Check the manifest against the shards it describes (rows, seq_len, shapes, dtypes, the shard list against
    the shard files present), every shard's sha256, datasets and values, and the teacher files.

    Exits 0 when everything matches, 1 with one line naming each bad file otherwise.
    """
    from tcache.teachercache.verify import verify_cache

    err = Console(stderr=True)
    # transient, and off when stderr is not a terminal: the bar is for watching, never for logs or pipes
    with Progress(TextColumn("hashing"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("hashing", total=None)
        report = verify_cache(cache, on_progress=lambda done, total: bar.update(task, completed=done, total=total))

    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        console = Console()
        t = Table(title=f"tcache verify {escape(report['cache'])}")
        for col in ("shard", "rows", "bytes", "status", "problems"):
            t.add_column(col, justify="right" if col in ("rows", "bytes") else "left")
        if report["manifest_problems"]:
            t.add_row("manifest.json", "", "", "[red]FAILED[/]", escape("; ".join(report["manifest_problems"])))
        for s in report["shards"]:
            t.add_row(s["file"], f"{s['rows']:,}", human_bytes(s["bytes"]), "ok" if s["ok"] else "[red]FAILED[/]",
                      escape("; ".join(s["problems"])))
        for x in report["teacher_files"]:
            t.add_row(x["file"], "", human_bytes(x["bytes"]) if x["bytes"] is not None else "-",
                      "ok" if x["ok"] else "[red]FAILED[/]", escape("; ".join(x["problems"])))
        console.print(t)
        good = report["shards_total"] - report["shards_bad"]
        teacher_good = report["teacher_files_total"] - report["teacher_files_bad"]
        console.print(("manifest.json FAILED; " if report["manifest_problems"] else "")
                      + f"{good} of {report['shards_total']} shards ok ({report['rows']:,} rows, "
                      f"{human_bytes(report['bytes'])}); {teacher_good} of {report['teacher_files_total']} "
                      "teacher files ok")
    if not report["ok"]:
        raise TcacheError(failure_line(report))
