"""`tcache stats`: what a cache holds, as rich tables or JSON."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tcache.cli.format import human_bytes, human_count
from tcache.cli.errors import friendly_errors


def _data_rows(dataset: dict) -> list[tuple[str, str]]:
    """The table's data rows: the one source's description; or a mixture's split, fields and config once, then
    its sources one a row, each with its weight (share) and how many of the cache's tokens are its."""
    def describe(d: dict, keys: tuple[str, ...]) -> str:
        return ", ".join(f"{k}={d[k]}" for k in keys if d.get(k) is not None)

    if "mixture" not in dataset:
        return [("dataset", describe(dataset, tuple(dataset)))]
    sources = dataset["mixture"]
    total = sum(d["tokens"] or 0 for d in sources)
    shared = describe(sources[0], ("config", "split", "text_field"))  # one --data-config, --split, --text-field
    rows = [("dataset", f"mixture of {len(sources)} sources; {shared}")]
    for d in sources:
        taken = f"{d['tokens']:,} tokens ({d['tokens'] / total:.1%})" if d["tokens"] is not None and total else "-"
        rows.append((f"  {d['path']}", f"weight {d['weight']:.3g}, {taken}"))
    return rows


@click.command()
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
@click.option("--sample-rows", default=256, show_default=True, help="Rows read for the value statistics.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="Also draw the sampled rows' top-k mass and hidden-state distributions into this image "
                   "(.png, .jpg, .pdf or .svg).")
@friendly_errors
def stats(cache, as_json, sample_rows, plot_file) -> None:
    """Show what a cache holds."""
    import contextlib

    from tcache import locks, plots, pngs
    from tcache.teachercache.stats import cache_stats

    if plot_file is not None:
        pngs.check_target(plot_file, "--plot")  # before the rows are read
    with locks.locked(plot_file, "--plot") if plot_file is not None else contextlib.nullcontext():
        if plot_file is not None:
            pngs.check_target(plot_file, "--plot")  # again, now that no other tcache command writes it
        s = cache_stats(cache, max_rows=sample_rows, keep_samples=plot_file is not None)
        if plot_file is not None:
            plots.plot_cache(s, plot_file, "--plot")
            del s["samples"]
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    console = Console()
    t = Table(title=f"tcache {s['cache']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    teacher = s["teacher"]
    rows = [
        ("teacher", f"{teacher['name_or_path']} ({teacher['model_type']}, revision {teacher['revision'] or '-'})"),
        ("tokenizer sha256", s["tokenizer_sha256"][:16] + "…"),
        ("vocab / hidden / layers", f"{s['vocab_size']:,} / {s['hidden_size']} / {s['num_layers']}"),
        ("tokens", f"{s['tokens']:,} of {s['tokens_requested']:,} requested"
                   + (" (data exhausted)" if s["data_exhausted"] else "")),
        ("rows / shards / seq_len", f"{s['rows']:,} / {s['shards']} / {s['seq_len']}"),
        ("top-k", str(s["top_k"])),
        ("hidden groups", f"{s['hidden_groups']}  layers {s['layer_groups']}"),
        *_data_rows(s["dataset"]),
        ("bytes on disk", f"{human_bytes(s['bytes_total'])} ({s['bytes_per_token']:.0f} B/token in shards)"),
    ]
    b = s["build"]
    if b:
        rows.append(("build", f"{human_count(b['tokens_per_s'] or 0)} tok/s, {b['seconds']:.1f} s on "
                              f"{b['device']} ({b['dtype']}, batch {b['batch_size']})"))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)

    f = Table(title="fields")
    for col in ("field", "dtype", "bytes", "B/token"):
        f.add_column(col, justify="right" if col in ("bytes", "B/token") else "left")
    for name, info in s["fields"].items():
        f.add_row(name, info["dtype"], human_bytes(info["bytes"]), f"{info['bytes_per_token']:.1f}")
    console.print(f)

    m = s["topk_mass"]
    v = Table(title=f"values ({m['rows_sampled']} rows sampled)")
    v.add_column("statistic")
    v.add_column("value", justify="right")
    if m["mean"] is not None:
        v.add_row("top-k probability mass, mean", f"{m['mean']:.4f}")
        for p in (1, 5, 50, 95, 99):
            v.add_row(f"top-k probability mass, p{p}", f"{m[f'p{p}']:.4f}")
    for g, r in enumerate(s["hidden_rms"]):
        v.add_row(f"hidden RMS, group {g}", f"{r:.4f}")
    console.print(v)
    console.print(f"[dim]hidden = {escape(s['hidden_source'])}[/]")
    if plot_file is not None:
        console.print(f"plot written: {escape(str(plot_file))}")
