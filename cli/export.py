"""`tcache export` (a student as a transformers model directory) and `tcache generate` (a quick look at its text)."""

from __future__ import annotations

import click
from rich.console import Console

from tcache.cli.errors import friendly_errors
from tcache.cli.interrupts import stops_cleanly
from tcache.cli.options import config_from, config_options
from tcache.student.inference.generate import ExportConfig, GenerateConfig


@click.command()
@config_options(ExportConfig)
@friendly_errors
def export(**options) -> None:
    """Write STUDENT as a HF model: AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)."""
    from tcache.student.inference.generate import export as run_export

    out = run_export(config_from(ExportConfig, options))
    Console(stderr=True).print(f"[green]exported[/]: {out}  (AutoModelForCausalLM.from_pretrained({str(out)!r}, "
                               "trust_remote_code=True))")


@click.command()
@config_options(GenerateConfig)
@friendly_errors
@stops_cleanly
def generate(**options) -> None:
    """Continue --prompt with MODEL (a student or its export), decoding from the recurrent state and printing each
    token as it comes. Ctrl-C (or SIGTERM) stops at the next token: the text so far stays, exit 130 (143)."""
    from tcache.student.inference.generate import generate as run_generate

    r = run_generate(config_from(GenerateConfig, options), on_text=_show)
    Console(stderr=True).print(f"[dim]{r['new_tokens']} tokens in {r['seconds']:.2f} s "
                               f"({r['tokens_per_s']:.1f} tok/s) on {r['device']}[/]")


def _show(text: str) -> None:
    """The prompt, then the text as it streams: stdout, flushed at each piece (click.echo flushes)."""
    click.echo(text, nl=False)
