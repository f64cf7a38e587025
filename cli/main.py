"""`tcache` entry point: the click group and the one place that turns library errors into CLI errors."""

from __future__ import annotations

import functools
import os

import click

from teachercache.errors import TcacheError


WRAPPED_MARKER = "Original Traceback"
ERROR_PREFIX = "TcacheError: "


def one_line(message: str) -> str:
    """The user's line of a TcacheError message. A DataLoader worker's error comes back to the main process
    re-raised as TcacheError("Caught TcacheError in DataLoader worker process 0.\nOriginal Traceback ...
    teachercache.errors.TcacheError: <message>"): only <message> is meant for the user."""
    if WRAPPED_MARKER in message and ERROR_PREFIX in message:
        return message.rsplit(ERROR_PREFIX, 1)[1].strip()
    return message


def friendly_errors(fn):
    """TcacheError -> `Error: <one line>` and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TcacheError as e:
            raise click.ClickException(one_line(str(e))) from None

    return wrapper


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
    from cli import build, distill, eval, plan, stats, verify

    main.add_command(build.build)
    main.add_command(plan.plan)
    main.add_command(stats.stats)
    main.add_command(verify.verify)
    main.add_command(distill.distill)
    main.add_command(eval.eval_cmd)


_register()

