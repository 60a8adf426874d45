"""``python -m cuebx`` runs the command line."""

from cuebx.cli import main

main()
