"""SIGINT / SIGTERM and resumable failures at the CLI: one line, the exit code, the --resume command."""

from __future__ import annotations

import functools
import os
import shlex
import sys

import click

from tcache.errors import Interrupted, TcacheError


def resume_command() -> str:
    """This command line with --resume added (as the user typed it, program name `tcache`)."""
    args = sys.argv[1:]
    return shlex.join(["tcache", *args, *([] if "--resume" in args else ["--resume"])])


def stops_cleanly(fn):
    """Interrupted -> `Stopped by SIGTERM...` on stderr, exit 128 + signal (130, 143), no traceback;
    a resumable error also prints the command that continues the run."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            what = f"; {e.detail}" if e.detail else ""
            click.echo(f"Stopped by {e.name}{what}.", err=True)
            if e.resumable:
                click.echo(f"Resume with: {resume_command()}", err=True)
            sys.exit(e.exit_code)
        except TcacheError as e:
            if getattr(e, "hdf5_unclosed", False):
                # End here: at interpreter exit HDF5 retries flushing the file that hit the full disk
                # and crashed the process (segmentation fault). Everything resumable is on disk already.
                click.echo(f"Error: {e} (resume with: {resume_command()})", err=True)
                sys.stderr.flush()
                sys.stdout.flush()
                os._exit(1)
            if e.resumable:
                raise click.ClickException(f"{e} (resume with: {resume_command()})") from None
            raise

    return wrapper
