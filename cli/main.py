"""`tcache` entry point: the click group and its commands."""

from __future__ import annotations

import os

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tcache")
def main() -> None:
    """Offline teacher-cache distillation: build a teacher cache once, distill an xLSTM student from it."""
    # Long documents are tokenised whole before packing; the tokenizer's max-length warning is noise here.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _register() -> None:
    from tcache.cli import build, distill, eval, export, merge, plan, plot, probe, stats, verify

    main.add_command(build.build)
    main.add_command(plan.plan)
    main.add_command(stats.stats)
    main.add_command(verify.verify)
    main.add_command(distill.distill)
    main.add_command(eval.eval_cmd)
    main.add_command(probe.probe)
    main.add_command(plot.plot)
    main.add_command(merge.merge)
    main.add_command(export.export)
    main.add_command(export.generate)


_register()

