"""`tcache build`: options -> BuildConfig -> teachercache.build.build, with a rich progress bar."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from tcache.cli.format import human_bytes, human_count
from tcache.cli.interrupts import stops_cleanly
from tcache.cli.errors import friendly_errors
from tcache.cli.options import config_file_option, config_from, config_options
from tcache.teachercache.config import BuildConfig


class _TokensColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{human_count(task.completed)}/{human_count(task.total or 0)} tok")


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{human_count(speed)} tok/s" if speed else "- tok/s")


class _BytesColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(human_bytes(task.fields.get("bytes", 0)))


# What only a build does: a plan writes nothing at --out (its sample run goes to a temporary directory).
BUILD_ONLY = ("overwrite", "resume")


class _Repeatable(click.Option):
    """--data, which a mixture repeats: click collects the paths into a tuple; a config file's one path (a YAML
    scalar, `data: FILE`) is a tuple of one, its list (`data: [A, B]`) the tuple."""

    def type_cast_value(self, ctx: click.Context, value):
        return super().type_cast_value(ctx, (value,) if isinstance(value, str) else value)


def _repeatable(fn, name: str):
    """Make the generated option of field `name` (DataSources.path: --data) repeatable, as generated otherwise
    (flag, help, required): the field is shared with `tcache eval`, whose --data is one path."""
    params = fn.__click_params__
    for k, p in enumerate(params):
        if p.name == name:
            params[k] = _Repeatable([*p.opts, p.name], type=p.type, required=p.required, help=p.help, multiple=True)
    return fn


def build_options(fn, skip: tuple[str, ...] = ()):
    """The options `build` and `plan` share (BuildConfig's fields, and --config to read them from a file), so a
    plan is made for exactly the build it describes."""
    return config_file_option(BuildConfig)(_repeatable(config_options(BuildConfig, skip=skip)(fn), "path"))


def build_config(**options) -> BuildConfig:
    return config_from(BuildConfig, options)


@click.command()
@build_options
@friendly_errors
@stops_cleanly
def build(**options) -> None:
    """Run the teacher once over a token budget and write the cache."""
    from tcache.teachercache.build import build as run_build

    cfg = build_config(**options)
    out = cfg.out
    from tcache import dist

    console = Console(stderr=True, quiet=not dist.is_main())  # under torchrun: rank 0 reports for all ranks
    columns = (TextColumn("[bold]build"), BarColumn(), _TokensColumn(), _RateColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), _BytesColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("build", total=cfg.rows * cfg.seq_len, bytes=0)

        def on_progress(done: int, total: int, nbytes: int) -> None:
            progress.update(task, completed=done, bytes=nbytes)

        manifest = run_build(cfg, on_progress)
    b = manifest.build
    if b.get("resumed_at_row") is not None:
        console.print(f"resumed after {b['resumed_at_row']:,} rows in complete shards")
    console.print(
        f"[green]cache written[/]: {out}  {manifest.tokens:,} tokens in {manifest.rows:,} rows, "
        f"{len(manifest.shards)} shard(s), {b['tokens_per_s']:,.0f} tok/s on {b['device']} ({b['dtype']})"
    )
    if manifest.data_exhausted:
        console.print(
            f"[yellow]note[/]: the data held only {manifest.tokens:,} of the {manifest.tokens_requested:,} "
            "tokens requested; the cache holds all of it"
        )
