"""The `toolq` command (the roof): typer commands over config, producers and workers,
with the operators' and developers' tools behind them (dev Redis, demo, benchmark,
exporter, status). Nothing below imports from here.

``toolq.cli:main`` is the console script; ``toolq.cli.app`` the typer app (imported here,
which also keeps the name from meaning the submodule ``toolq.cli.app``).
"""

from toolq.cli.app import app, main

__all__ = ["app", "main"]
