"""`tcache build`: options -> BuildConfig -> teachercache.build.build, with a rich progress bar."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from tcache.cli.format import human_bytes, human_count
from tcache.cli.interrupts import stops_cleanly
from tcache.cli.errors import friendly_errors
from tcache.teachercache import schema


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


_OPTIONS = [
    click.option("--teacher", required=True, help="HF causal LM: hub id (HuggingFaceTB/SmolLM2-360M) or local directory."),
    click.option("--data", required=True,
                 help="HF dataset id, or a local .json/.jsonl/.txt/.parquet/.csv file or directory (.xz/.gz ok)."),
    click.option("--tokens", required=True, help="Token budget: 100000, 2.5k, 512M, 1B. Rounded down to whole rows."),
    click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to create."),
    click.option("--seq-len", default=512, show_default=True, help="Tokens per packed row."),
    click.option("--top-k", default=64, show_default=True, help="Teacher log-probs kept per position."),
    click.option("--hidden-groups", default=1, show_default=True,
                 help="Average the teacher's layers in G contiguous groups (storage grows x G); 0 stores none (KD-only)."),
    click.option("--hidden-dtype", default=schema.DEFAULT_HIDDEN_DTYPE, show_default=True,
                 type=click.Choice(list(schema.HIDDEN_DTYPES)), help="Stored hidden states: nf4 (4-bit NormalFloat, 32-value blocks with an fp16 scale), int8 (per-position scale), fp16, bf16."),
    click.option("--logprob-dtype", default="fp16", show_default=True, type=click.Choice(["fp16", "fp32"]),
                 help="Stored top-k log-probs."),
    click.option("--data-config", default=None, help="Hub dataset configuration name."),
    click.option("--split", default="train", show_default=True, help="Dataset split."),
    click.option("--text-field", default="text", show_default=True, help="Column holding the text."),
    click.option("--batch-size", default=0, show_default=True, help="Rows per teacher forward; 0: automatic."),
    click.option("--shard-rows", default=1024, show_default=True, help="Rows per HDF5 shard."),
    click.option("--tokenizer-workers", default=-1, show_default=True,
                 help="Processes tokenising ahead of the teacher; 0: a thread; -1: min(8, cores/2) on GPU, 0 on CPU."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N."),
    click.option("--dtype", default="auto", show_default=True, help="auto (bf16 GPU / fp32 CPU), bf16, fp16, fp32."),
    click.option("--revision", default=None, help="Hub revision of the teacher."),
    click.option("--overwrite", is_flag=True,
                 help="Replace the cache (or interrupted build) at --out: built beside it, swapped in when complete."),
    click.option("--resume", is_flag=True,
                 help="Continue an interrupted build (same options) from its last complete shard."),
]


def build_options(fn):
    """The options `build` and `plan` share, so a plan is made for exactly the build it describes."""
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def build_config(teacher, data, tokens, out, seq_len, top_k, hidden_groups, hidden_dtype, logprob_dtype,
                 data_config, split, text_field, batch_size, shard_rows, tokenizer_workers, device, dtype, revision,
                 overwrite, resume):
    from tcache.teachercache.config import BuildConfig
    from tcache.units import parse_count
    from tcache.text import DataSpec

    return BuildConfig(
        teacher=teacher, out=out, tokens=parse_count(tokens), seq_len=seq_len, top_k=top_k,
        data=DataSpec(path=data, config=data_config, split=split, text_field=text_field),
        hidden_groups=hidden_groups, hidden_dtype=hidden_dtype, logprob_dtype=logprob_dtype, batch_size=batch_size,
        rows_per_shard=shard_rows, tokenizer_workers=tokenizer_workers, device=device, dtype=dtype, revision=revision, overwrite=overwrite,
        resume=resume,
    )


@click.command()
@build_options
@friendly_errors
@stops_cleanly
def build(**options) -> None:
    """Run the teacher once over a token budget and write the cache."""
    from tcache.teachercache.build import build as run_build

    cfg = build_config(**options)
    out = cfg.out
    console = Console(stderr=True)
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
