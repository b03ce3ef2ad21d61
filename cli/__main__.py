"""``python -m toolq.cli``: the `toolq` command, as ``python -m toolq`` runs it."""

from toolq.cli import main

main()
