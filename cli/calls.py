"""Commands on tool calls: `run`, `enqueue`, `result`, `cancel` (the dead-letter list's
are in :mod:`toolq.cli.deadletters`)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from toolq.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PENDING,
    ConfigOption,
    InputOption,
    ProfileOption,
    QueueOption,
    fail,
    guard,
    load,
    parse_input,
    print_result,
)

if TYPE_CHECKING:
    from toolq.config.settings import Settings
    from toolq.producers import ToolCall

EnvOption = Annotated[
    list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the tool; repeatable.")
]
TimeoutOption = Annotated[
    str | None, typer.Option("--timeout", "-t", help="Soft time limit for this call, e.g. 10s.")
]
ToolConfigOption = Annotated[
    str | None,
    typer.Option(
        "--tool-config",
        help="JSON object overriding the tool's config (its second argument) key by key.",
    ),
]
MaxAttemptsOption = Annotated[
    int | None, typer.Option("--max-attempts", min=1, help="Override the retry policy's attempts.")
]
NoRetryOption = Annotated[bool, typer.Option("--no-retry", help="Run once, whatever happens.")]
IdempotencyOption = Annotated[
    str | None,
    typer.Option(
        "--idempotency-key", help="Same key within idempotency_ttl: the first call is reused."
    ),
]
PriorityOption = Annotated[
    int | None,
    typer.Option("--priority", min=0, max=9, help="0 (default) to 9 (most urgent)."),
]
NoCacheOption = Annotated[
    bool, typer.Option("--no-cache", help="Run the tool even if its result cache has an answer.")
]
BlockOption = Annotated[
    str | None,
    typer.Option("--block", help="Queue full: wait up to this long for room (else exit 2)."),
]
ToolIdArgument = Annotated[str, typer.Argument(help="The tool id, as exported by the entrypoint.")]
CallIdArgument = Annotated[str, typer.Argument(help="The id printed by `toolq enqueue`.")]


def _read_batch(path: str) -> list[Any]:
    """The inputs of a JSON-lines file (blank lines skipped)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        fail(f"--batch: cannot read {path}: {exc.strerror}")
    inputs = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            inputs.append(parse_input(line, f"--batch line {number}"))
    return inputs


def _parse_tool_config(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value = parse_input(raw, "--tool-config")
    if not isinstance(value, dict):
        fail("--tool-config must be a JSON object")
    return value


def _parse_env(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            fail(f"--env takes KEY=VALUE (got {pair!r})")
        env[key] = value
    return env


def _show_producer_warnings() -> None:
    """The client's warnings (a queue no live worker consumes, a queue outside the
    configuration) as ``toolq: warning: ...`` lines on stderr, once each."""
    logger = logging.getLogger("toolq.producer")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("toolq: warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _enqueue(
    settings: Settings,
    tool_id: str,
    raw_input: str | None,
    env: list[str] | None,
    timeout: str | None,
    queue: str | None,
    max_attempts: int | None,
    no_retry: bool,
    idempotency_key: str | None,
    tool_config: str | None = None,
    *,
    priority: int | None = None,
    no_cache: bool = False,
    block: str | None = None,
) -> ToolCall:
    """`run` and `enqueue`: parse the options, enqueue one call."""
    from toolq.producers import ToolClient

    _show_producer_warnings()
    client = ToolClient(settings)
    payload, env_map = parse_input(raw_input), _parse_env(env)
    config_map = _parse_tool_config(tool_config)
    return guard(
        lambda: client.enqueue(
            tool_id,
            payload,
            env_map,
            timeout,
            queue,
            config=config_map,
            max_attempts=max_attempts,
            retry=not no_retry,
            idempotency_key=idempotency_key,
            priority=priority,
            cache=not no_cache,
            block=block,
        )
    )


def run(
    tool_id: ToolIdArgument,
    input: InputOption = None,
    env: EnvOption = None,
    timeout: TimeoutOption = None,
    queue: QueueOption = None,
    tool_config: ToolConfigOption = None,
    max_attempts: MaxAttemptsOption = None,
    no_retry: NoRetryOption = False,
    idempotency_key: IdempotencyOption = None,
    priority: PriorityOption = None,
    no_cache: NoCacheOption = False,
    block: BlockOption = None,
    wait: Annotated[
        str | None, typer.Option(help="Give up waiting after this long (exit 3).")
    ] = None,
    batch: Annotated[
        str | None,
        typer.Option(
            help="Run one call per line of this JSON-lines file of inputs ('-' reads stdin), "
            "sent in chunks; prints one envelope per line, in order.",
        ),
    ] = None,
    chunk_size: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="With --batch: calls per message (default: auto)."),
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Enqueue a call, wait for it, print the result envelope as JSON.

    Exit 0 if it succeeded, 1 if it failed, 3 if --wait ran out (it may still run)."""
    from toolq.errors import ResultTimeout

    if batch is not None:
        if input is not None or idempotency_key is not None:
            fail("--batch takes the inputs from its file: no --input or --idempotency-key")
        inputs = _read_batch(batch)
        from toolq.producers import ToolClient

        _show_producer_warnings()
        client = ToolClient(load(config, profile))
        calls = guard(
            lambda: client.enqueue_many(
                tool_id,
                inputs,
                _parse_env(env),
                timeout,
                queue,
                config=_parse_tool_config(tool_config),
                max_attempts=max_attempts,
                retry=not no_retry,
                priority=priority,
                cache=not no_cache,
                block=block,
                chunk_size=chunk_size,
            )
        )
        try:
            results = guard(lambda: client.gather(calls, wait))
        except ResultTimeout as exc:
            fail(f"{exc} (calls are still queued or running)", EXIT_PENDING)
        for result in results:
            typer.echo(json.dumps(result.to_dict(), separators=(",", ":")))
        raise typer.Exit(EXIT_OK if all(r.ok for r in results) else EXIT_FAILED)
    call = _enqueue(
        load(config, profile),
        tool_id,
        input,
        env,
        timeout,
        queue,
        max_attempts,
        no_retry,
        idempotency_key,
        tool_config,
        priority=priority,
        no_cache=no_cache,
        block=block,
    )
    try:
        result = guard(lambda: call.result(timeout=wait))
    except ResultTimeout as exc:
        fail(f"{exc} (the call is still queued or running)", EXIT_PENDING)
    print_result(result)


def enqueue(
    tool_id: ToolIdArgument,
    input: InputOption = None,
    env: EnvOption = None,
    timeout: TimeoutOption = None,
    queue: QueueOption = None,
    tool_config: ToolConfigOption = None,
    max_attempts: MaxAttemptsOption = None,
    no_retry: NoRetryOption = False,
    idempotency_key: IdempotencyOption = None,
    priority: PriorityOption = None,
    no_cache: NoCacheOption = False,
    block: BlockOption = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Enqueue a call and print its id (fetch the result with `toolq result ID`)."""
    call = _enqueue(
        load(config, profile),
        tool_id,
        input,
        env,
        timeout,
        queue,
        max_attempts,
        no_retry,
        idempotency_key,
        tool_config,
        priority=priority,
        no_cache=no_cache,
        block=block,
    )
    typer.echo(call.id)


def result(
    call_id: CallIdArgument,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait until the call ends.")] = False,
    wait_timeout: Annotated[
        str | None, typer.Option("--timeout", help="With --wait: give up after this long.")
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Print a call's result envelope; without --wait, exit 3 if it has not finished."""
    from toolq.errors import ResultTimeout
    from toolq.producers import ToolClient

    client = ToolClient(load(config, profile))
    call = client.call(call_id)
    if not wait and not guard(call.ready):
        typer.echo(json.dumps({"id": call_id, "status": "pending", "state": call.state()}))
        raise typer.Exit(EXIT_PENDING)
    try:
        outcome = guard(lambda: call.result(timeout=wait_timeout))
    except ResultTimeout as exc:
        fail(str(exc), EXIT_PENDING)
    print_result(outcome)


def cancel(
    call_id: CallIdArgument,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Cancel a call: queued, it never runs; running, Bun is stopped; its result is
    `cancelled`. Exit 1 if it had already finished (nothing changes)."""
    from toolq.producers import ToolClient

    with ToolClient(load(config, profile)) as client:
        outcome = guard(lambda: client.cancel(call_id))
    typer.echo(json.dumps({"id": call_id, "outcome": outcome}))
    if outcome == "finished":
        raise typer.Exit(EXIT_FAILED)
