"""``python -m imgpipe`` runs the CLI."""

from imgpipe.cli import main

main()
