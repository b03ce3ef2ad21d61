"""The `toolq` command: the typer app, with each command registered from the module that
groups it (Celery's ``celery/bin`` style). Commands parse options, call into config,
producers, workers and the tools beside them here, and print; they decide nothing.

- :mod:`toolq.cli.calls`: run, enqueue, result, cancel, dlq;
- :mod:`toolq.cli.operations`: worker, health, flower, status, exporter, breakers;
- :mod:`toolq.cli.project`: install, config, keygen;
- :mod:`toolq.cli.dev`: demo, loadtest, bench.

Exit codes (:mod:`toolq.cli.common`): 0 success; 1 the tool call failed; 2 a usage,
configuration or connection error; 3 no result yet (pending, or `--wait` ran out).
"""

from __future__ import annotations

import typer

from toolq.cli import calls, deadletters, dev, operations, project

app = typer.Typer(
    name="toolq",
    help="Run Compozy-style Bun tools through Redis and Celery workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# In this order in `toolq --help`.
app.command()(operations.worker)
app.command()(operations.health)
app.command()(calls.run)
app.command()(calls.enqueue)
app.command()(calls.result)
app.command()(calls.cancel)
app.command()(dev.demo)
app.command()(operations.flower)
app.command()(operations.status)
app.command()(operations.exporter)
app.command()(dev.loadtest)
app.command()(dev.bench)
app.command()(project.install)
app.command("config")(project.show_config)
app.command()(project.keygen)
app.add_typer(operations.breakers_app, name="breakers")
app.add_typer(deadletters.dlq_app, name="dlq")


def main() -> None:
    app()
