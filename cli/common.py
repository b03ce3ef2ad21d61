"""What every `toolq` command shares: exit codes, the options they repeat, errors turned
into one line and an exit code, settings loading, reading JSON options and printing.

Exit codes: 0 success; 1 the tool call failed; 2 a usage, configuration or
connection error; 3 no result yet (pending, or `--wait` ran out).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from toolq.config.settings import Settings
    from toolq.envelope import ToolResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PENDING = 0, 1, 2, 3

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Settings file (default: $TOOLQ_CONFIG, ./compozy.yaml)."),
]
ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="production or development (default: $TOOLQ_PROFILE)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
InputOption = Annotated[
    str | None, typer.Option("--input", "-i", help="Tool input as JSON ('-' reads stdin).")
]
QueueOption = Annotated[str | None, typer.Option("--queue", "-q", help="Queue to send to.")]

T = TypeVar("T")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"toolq: {message}", err=True)
    raise typer.Exit(code)


def guard(action: Callable[[], T]) -> T:
    """Turn toolq's and the broker's errors into one line on stderr and an exit code."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    from toolq.errors import BrokerUnavailable, ConfigError, InvalidInput, QueueFull

    try:
        return action()
    except ConfigError as exc:
        fail(str(exc))
    except InvalidInput as exc:
        fail(f"invalid call: {exc.message}")
    except BrokerUnavailable as exc:
        fail(str(exc))
    except QueueFull as exc:
        fail(f"{exc}; nothing was enqueued")
    except (RedisError, OperationalError) as exc:  # operator commands talk to Redis directly
        fail(f"cannot reach Redis: {exc}")


def load(config: Path | None, profile: str | None, **overrides: Any) -> Settings:
    """The settings (and the secret key, when one is set), or one line and exit 2."""
    from toolq.config.loader import load_settings
    from toolq.sealing import load_sealer

    settings = guard(lambda: load_settings(config, profile, overrides=overrides))
    guard(lambda: load_sealer(settings))  # a malformed key: one line, exit 2
    return settings


def parse_input(raw: str | None, option: str = "--input") -> Any:
    if raw is None:
        return {}
    if raw == "-":
        raw = sys.stdin.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        fail(f"{option} is not valid JSON: {exc}")
    except RecursionError:
        fail(f"{option} nests too deeply")


def print_table(
    columns: list[str], rows: list[list[str]], *, empty: str, title: str | None = None
) -> None:
    """A table on a terminal; tab-separated lines with whole values when piped (so an
    id can be cut and fed back: ``toolq dlq list | cut -f1``). The first column (an id
    or a name) is never truncated, on a narrow terminal either."""
    if not rows:
        typer.echo(empty)
        return
    if not sys.stdout.isatty():
        for line in [columns, *rows]:
            typer.echo("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in line))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column(columns[0], no_wrap=True, overflow="fold", min_width=8)
    for column in columns[1:]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def print_result(result: ToolResult) -> NoReturn:
    typer.echo(json.dumps(result.to_dict(), indent=2, sort_keys=False))
    raise typer.Exit(EXIT_OK if result.ok else EXIT_FAILED)
