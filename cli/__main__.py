"""`python -m cli` runs the `tcache` command (for machines where the package is not installed)."""

from cli.main import main

main()
