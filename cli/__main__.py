"""`python -m tcache.cli` runs the `tcache` command."""

from tcache.cli.main import main

main()
