"""`python -m tcache.cli` runs the `tcache` command."""

from tcache.cli.entry import run

run()
