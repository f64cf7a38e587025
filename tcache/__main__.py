"""`python -m tcache` runs the `tcache` command (also from a checkout that is not installed)."""

from tcache.cli.entry import run

run()
