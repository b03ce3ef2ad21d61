"""The `toolq` command. Each command calls into config, producers or workers; no logic here.

Exit codes: 0 success; 1 the tool call failed; 2 a usage, configuration or
connection error; 3 no result yet (pending, or `--wait` ran out).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from toolq.config.loader import load_settings
from toolq.config.settings import Settings, redact_url
from toolq.envelope import ToolResult
from toolq.errors import BrokerUnavailable, ConfigError, InvalidInput, ResultTimeout

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PENDING = 0, 1, 2, 3

app = typer.Typer(
    name="toolq",
    help="Run Compozy-style Bun tools through Redis and Celery workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Settings file (default: $TOOLQ_CONFIG, ./compozy.yaml)."),
]
ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="production or development (default: $TOOLQ_PROFILE)."),
]

T = TypeVar("T")


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"toolq: {message}", err=True)
    raise typer.Exit(code)


def _guard(action: Callable[[], T]) -> T:
    """Turn toolq's and the broker's errors into one line on stderr and an exit code."""
    try:
        return action()
    except ConfigError as exc:
        _fail(str(exc))
    except InvalidInput as exc:
        _fail(f"invalid call: {exc.message}")
    except BrokerUnavailable as exc:
        _fail(str(exc))


def _settings(config: Path | None, profile: str | None, **overrides: Any) -> Settings:
    return _guard(lambda: load_settings(config, profile, overrides=overrides))


def _parse_input(raw: str | None) -> Any:
    if raw is None:
        return {}
    if raw == "-":
        raw = sys.stdin.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        _fail(f"--input is not valid JSON: {exc}")


def _parse_env(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            _fail(f"--env takes KEY=VALUE (got {pair!r})")
        env[key] = value
    return env


def _print_result(result: ToolResult) -> NoReturn:
    typer.echo(json.dumps(result.to_dict(), indent=2, sort_keys=False))
    raise typer.Exit(EXIT_OK if result.ok else EXIT_FAILED)


InputOption = Annotated[
    str | None, typer.Option("--input", "-i", help="Tool input as JSON ('-' reads stdin).")
]
EnvOption = Annotated[
    list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the tool; repeatable.")
]
TimeoutOption = Annotated[
    str | None, typer.Option("--timeout", "-t", help="Soft time limit for this call, e.g. 10s.")
]
QueueOption = Annotated[str | None, typer.Option("--queue", "-q", help="Queue to send to.")]


@app.command()
def worker(
    config: ConfigOption = None,
    profile: ProfileOption = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, help="Tools run at once (default: performance.max_concurrent_tools)."),
    ] = None,
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues to consume (default: toolq).")
    ] = None,
    hostname: Annotated[
        str | None, typer.Option(help="Node name (default: toolq-<pid>@<host>).")
    ] = None,
    pool: Annotated[
        str, typer.Option(help="Celery pool: threads (default) or prefork.")
    ] = "threads",
    loglevel: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR.")] = "INFO",
) -> None:
    """Start a worker that runs tool calls with Bun, at most max_concurrent_tools at once."""
    from toolq.workers.worker import run_worker

    if pool not in ("threads", "prefork"):
        _fail(f"--pool must be threads or prefork (got {pool!r})")
    settings = _settings(config, profile)
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    _guard(
        lambda: run_worker(
            settings,
            concurrency=concurrency,
            queues=queue_list,
            hostname=hostname,
            pool=pool,  # type: ignore[arg-type]
            loglevel=loglevel,
        )
    )


@app.command()
def run(
    tool_id: Annotated[str, typer.Argument(help="The tool id, as exported by the entrypoint.")],
    input: InputOption = None,
    env: EnvOption = None,
    timeout: TimeoutOption = None,
    queue: QueueOption = None,
    wait: Annotated[
        str | None, typer.Option(help="Give up waiting after this long (exit 3).")
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Enqueue a call, wait for it, print the result envelope as JSON."""
    from toolq.producers import ToolClient

    client = ToolClient(_settings(config, profile))
    payload, env_map = _parse_input(input), _parse_env(env)
    call = _guard(lambda: client.enqueue(tool_id, payload, env_map, timeout, queue))
    try:
        result = _guard(lambda: call.result(timeout=wait))
    except ResultTimeout as exc:
        _fail(f"{exc} (the call is still queued or running)", EXIT_PENDING)
    _print_result(result)


@app.command()
def enqueue(
    tool_id: Annotated[str, typer.Argument(help="The tool id, as exported by the entrypoint.")],
    input: InputOption = None,
    env: EnvOption = None,
    timeout: TimeoutOption = None,
    queue: QueueOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Enqueue a call and print its id (fetch the result with `toolq result ID`)."""
    from toolq.producers import ToolClient

    client = ToolClient(_settings(config, profile))
    payload, env_map = _parse_input(input), _parse_env(env)
    call = _guard(lambda: client.enqueue(tool_id, payload, env_map, timeout, queue))
    typer.echo(call.id)


@app.command()
def result(
    call_id: Annotated[str, typer.Argument(help="The id printed by `toolq enqueue`.")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait until the call ends.")] = False,
    wait_timeout: Annotated[
        str | None, typer.Option("--timeout", help="With --wait: give up after this long.")
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Print a call's result envelope; without --wait, exit 3 if it has not finished."""
    from toolq.producers import ToolClient

    client = ToolClient(_settings(config, profile))
    call = client.call(call_id)
    if not wait and not _guard(call.ready):
        typer.echo(json.dumps({"id": call_id, "status": "pending", "state": call.state()}))
        raise typer.Exit(EXIT_PENDING)
    try:
        outcome = _guard(lambda: call.result(timeout=wait_timeout))
    except ResultTimeout as exc:
        _fail(str(exc), EXIT_PENDING)
    _print_result(outcome)


@app.command()
def demo(
    project: Annotated[
        Path | None,
        typer.Option(help="A Compozy tool project (default: the repository's examples/weather)."),
    ] = None,
) -> None:
    """Start a worker on the example project, run a batch of calls, show the outcomes."""
    from toolq.demo import run_demo

    raise typer.Exit(_guard(lambda: run_demo(project)))


@app.command("config")
def show_config(config: ConfigOption = None, profile: ProfileOption = None) -> None:
    """Print the effective settings (after profile, file, TOOLQ_* and defaults) as JSON."""
    settings = _settings(config, profile)
    data = settings.model_dump(mode="json", by_alias=True)
    data["redis_url"] = redact_url(data["redis_url"])
    data["_source"] = settings.source
    typer.echo(json.dumps(data, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
