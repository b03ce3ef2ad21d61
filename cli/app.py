"""The `toolq` command. Each command calls into config, producers or workers; no logic here.

Exit codes: 0 success; 1 the tool call failed; 2 a usage, configuration or
connection error; 3 no result yet (pending, or `--wait` ran out).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from toolq.config.loader import load_settings
from toolq.config.settings import Settings, redact_url
from toolq.envelope import ToolResult
from toolq.errors import BrokerUnavailable, ConfigError, InvalidInput, QueueFull, ResultTimeout

if TYPE_CHECKING:
    from toolq.producers import ToolCall
    from toolq.workers.breaker import Breakers
    from toolq.workers.deadletter import DeadLetters

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
    except QueueFull as exc:
        _fail(f"{exc}; nothing was enqueued")
    except (RedisError, OperationalError) as exc:  # operator commands talk to Redis directly
        _fail(f"cannot reach Redis: {exc}")


def _settings(config: Path | None, profile: str | None, **overrides: Any) -> Settings:
    from toolq.sealing import load_sealer

    settings = _guard(lambda: load_settings(config, profile, overrides=overrides))
    _guard(lambda: load_sealer(settings))  # a malformed key: one line, exit 2
    return settings


def _parse_input(raw: str | None, option: str = "--input") -> Any:
    if raw is None:
        return {}
    if raw == "-":
        raw = sys.stdin.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        _fail(f"{option} is not valid JSON: {exc}")
    except RecursionError:
        _fail(f"{option} nests too deeply")


def _read_batch(path: str) -> list[Any]:
    """The inputs of a JSON-lines file (blank lines skipped)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        _fail(f"--batch: cannot read {path}: {exc.strerror}")
    inputs = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            inputs.append(_parse_input(line, f"--batch line {number}"))
    return inputs


def _parse_tool_config(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value = _parse_input(raw, "--tool-config")
    if not isinstance(value, dict):
        _fail("--tool-config must be a JSON object")
    return value


def _parse_env(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            _fail(f"--env takes KEY=VALUE (got {pair!r})")
        env[key] = value
    return env


def _print_table(
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
    payload, env_map = _parse_input(raw_input), _parse_env(env)
    config_map = _parse_tool_config(tool_config)
    return _guard(
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
    health_file: Annotated[
        Path | None,
        typer.Option(help="Keep a heartbeat file here for `toolq health` (container probes)."),
    ] = None,
) -> None:
    """Start a worker that runs tool calls with Bun, at most max_concurrent_tools at once."""
    if pool not in ("threads", "prefork"):
        _fail(f"--pool must be threads or prefork (got {pool!r})")
    settings = _settings(config, profile)
    from toolq.workers.worker import run_worker

    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    _guard(
        lambda: run_worker(
            settings,
            concurrency=concurrency,
            queues=queue_list,
            hostname=hostname,
            pool=pool,  # type: ignore[arg-type]
            loglevel=loglevel,
            health_file=health_file,
        )
    )


@app.command()
def health(
    file: Annotated[Path, typer.Option("--file", help="The worker's --health-file.")],
    ready: Annotated[
        bool, typer.Option("--ready", help="Readiness: also ready and not stopping.")
    ] = False,
    max_age: Annotated[
        str, typer.Option(help="Liveness fails when the last heartbeat is older than this.")
    ] = "30s",
) -> None:
    """Probe a worker from its heartbeat file (exit 0 live/ready, 1 not): no Redis, no
    broadcast to the fleet."""
    from toolq.config.durations import parse_duration
    from toolq.health import check

    try:
        max_age_s = parse_duration(max_age)
    except ValueError as exc:
        _fail(f"--max-age: {exc}")
    problem = check(file, ready=ready, max_age_s=max_age_s)
    if problem is not None:
        _fail(problem, EXIT_FAILED)


@app.command()
def run(
    tool_id: Annotated[str, typer.Argument(help="The tool id, as exported by the entrypoint.")],
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
    if batch is not None:
        if input is not None or idempotency_key is not None:
            _fail("--batch takes the inputs from its file: no --input or --idempotency-key")
        inputs = _read_batch(batch)
        from toolq.producers import ToolClient

        _show_producer_warnings()
        client = ToolClient(_settings(config, profile))
        calls = _guard(
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
            results = _guard(lambda: client.gather(calls, wait))
        except ResultTimeout as exc:
            _fail(f"{exc} (calls are still queued or running)", EXIT_PENDING)
        for result in results:
            typer.echo(json.dumps(result.to_dict(), separators=(",", ":")))
        raise typer.Exit(EXIT_OK if all(r.ok for r in results) else EXIT_FAILED)
    call = _enqueue(
        _settings(config, profile),
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
        _settings(config, profile),
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
def cancel(
    call_id: Annotated[str, typer.Argument(help="The id printed by `toolq enqueue`.")],
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Cancel a call: queued, it never runs; running, Bun is stopped; its result is
    `cancelled`. Exit 1 if it had already finished (nothing changes)."""
    from toolq.producers import ToolClient

    with ToolClient(_settings(config, profile)) as client:
        outcome = _guard(lambda: client.cancel(call_id))
    typer.echo(json.dumps({"id": call_id, "outcome": outcome}))
    if outcome == "finished":
        raise typer.Exit(EXIT_FAILED)


@app.command()
def demo(
    project: Annotated[
        Path | None,
        typer.Option(help="A Compozy tool project (default: the weather project in toolq)."),
    ] = None,
) -> None:
    """Start a worker on the example project, run a batch of calls, show the outcomes."""
    from toolq.cli.demo import run_demo

    raise typer.Exit(_guard(lambda: run_demo(project)))


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="HTTP port.")] = 5555,
    address: Annotated[
        str, typer.Option(help="Listen address (default: this host only).")
    ] = "127.0.0.1",
    basic_auth: Annotated[
        str | None,
        typer.Option(
            help="user:password (comma-separate several); required beyond localhost. "
            "Visible to every local user in the process list: prefer --basic-auth-file."
        ),
    ] = None,
    basic_auth_file: Annotated[
        Path | None,
        typer.Option(help="A file holding user:password (a secret mount), one per line."),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="A host name Flower is served as (a proxy's, an ingress's); repeatable. "
            "Local names, the listen address and this host's name are always allowed; "
            "any other Host gets 403 (DNS rebinding)."
        ),
    ] = None,
    max_tasks: Annotated[
        int, typer.Option(min=100, help="Finished calls Flower keeps in memory.")
    ] = 10_000,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Start Flower on the toolq app: workers, calls (toolq:<tool id>; FAILURE when the tool
    failed) and queue lengths."""
    from toolq.cli.flower_hosts import allowed_hosts, restrict_hosts
    from toolq.config.celery_app import make_celery

    if basic_auth_file is not None:
        try:
            lines = basic_auth_file.read_text().split()
        except OSError as exc:
            _fail(f"--basic-auth-file: cannot read {basic_auth_file}: {exc.strerror}")
        basic_auth = ",".join(line for line in lines if line)
    if address not in ("127.0.0.1", "localhost", "::1") and not basic_auth:
        _fail("Flower on a non-local address needs --basic-auth-file (or --basic-auth)")
    restrict_hosts(allowed_hosts(address, allowed_host or ()))
    settings = _settings(config, profile)
    argv = [
        "flower",
        f"--port={port}",
        f"--address={address}",
        f"--max_tasks={max_tasks}",
        "--purge_offline_workers=600",
    ]
    if basic_auth:
        argv.append(f"--basic_auth={basic_auth}")
    app = make_celery(settings)
    # Workers send task events on demand (performance.task_events): ask now, so calls
    # show from the first second; Flower itself asks again every 5 s (so a Redis that is
    # not up yet only delays this).
    try:
        app.control.enable_events()
    except (OperationalError, RedisError, OSError) as exc:
        typer.echo(f"toolq: cannot ask workers for task events yet ({exc})", err=True)
    app.start(argv)


def _sandbox_cell(node: dict[str, Any]) -> str:
    """Whether a worker's tools run sandboxed, as `toolq status` shows it."""
    if node.get("sandboxed") is None:
        return "?"
    if node["sandboxed"]:
        return "yes (bwrap)"
    if node.get("sandbox_mode") == "off":
        return "NO (runtime.sandbox: off)"
    return "NO (this host cannot sandbox: see the worker's log)"


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Queues (messages and calls waiting, caps), workers with running/reserved calls and
    whether their tools run sandboxed, open breakers, dead letters, cluster-wide slots and
    rate limits."""
    from toolq.cli.status import cluster_status

    settings = _settings(config, profile)
    report = _guard(lambda: cluster_status(settings))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    project = report["project"]
    typer.echo(f"project: {project}" if project else "project: (none: shared toolq keys)")
    _print_table(
        ["queue", "messages waiting", "calls waiting", "cap (messages)"],
        [
            [
                queue["name"],
                str(queue["length"]),
                str(queue["calls"]),
                "-" if queue["cap"] is None else str(queue["cap"]),
            ]
            for queue in report["queues"]
        ],
        empty="no queues",
        title="queues",
    )
    _print_table(
        ["worker", "queues", "running", "reserved", "sandbox"],
        [
            [
                node["name"],
                ",".join(node["queues"]),
                str(node["running"]),
                str(node["reserved"]),
                _sandbox_cell(node),
            ]
            for node in report["workers"]
        ],
        empty="no workers online",
        title="workers online",
    )
    breakers = [b for b in report["breakers"] if b["state"] != "closed"]
    typer.echo(
        "breakers not closed: "
        + (", ".join(f"{b['tool_id']} ({b['state']})" for b in breakers) or "none")
    )
    typer.echo(f"dead letters: {report['dead_letters']}")
    flow = report["flow"]
    if flow["slots"]:
        _print_table(
            ["tool", "key", "slots in use", "waiting for a slot"],
            [
                [
                    s["tool_id"],
                    "-" if s["key"] is None else s["key"],
                    f"{s['in_use']}/{s['limit']}",
                    str(s["waiting"]),
                ]
                for s in flow["slots"]
            ],
            empty="",
            title="cluster-wide slots",
        )
    if flow["rate"]:
        _print_table(
            ["tool", "rate limit", "mode", "waiting for a token"],
            [[r["tool_id"], r["rate_limit"], r["mode"], str(r["waiting"])] for r in flow["rate"]],
            empty="",
            title="rate limits",
        )


@app.command()
def exporter(
    port: Annotated[int, typer.Option(help="HTTP port of /metrics.")] = 9541,
    address: Annotated[
        str, typer.Option(help="Listen address (default: this host only).")
    ] = "127.0.0.1",
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues (default: every configured one).")
    ] = None,
    min_interval: Annotated[
        str, typer.Option(help="Read Redis at most this often, however often scraped.")
    ] = "5s",
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Serve the true backlog per queue (calls, not messages, over every priority, and
    calls waiting on flow control) as Prometheus metrics, for autoscaling."""
    from toolq.cli.exporter import serve_forever
    from toolq.config.durations import parse_duration

    settings = _settings(config, profile)
    try:
        interval_s = parse_duration(min_interval)
    except ValueError as exc:
        _fail(f"--min-interval: {exc}")
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    _guard(
        lambda: serve_forever(
            settings, port=port, address=address, queues=queue_list, min_interval_s=interval_s
        )
    )


@app.command()
def loadtest(
    tool: Annotated[str, typer.Option("--tool", help="Tool id to call.")],
    input: InputOption = None,
    rps: Annotated[float, typer.Option(min=0.1, help="Target calls per second.")] = 10.0,
    duration: Annotated[str, typer.Option(help="How long to send, e.g. 30s.")] = "10s",
    concurrency: Annotated[int, typer.Option(min=1, help="Calls outstanding at most.")] = 32,
    queue: QueueOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Pace calls at a target rate against the running cluster; report latency and throughput."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from toolq.cli.loadtest import run_loadtest
    from toolq.config.durations import parse_duration
    from toolq.producers import ToolClient

    try:
        duration_s = parse_duration(duration)
    except ValueError as exc:
        _fail(f"--duration: {exc}")
    settings = _settings(config, profile)
    payload = _parse_input(input)
    client = ToolClient(settings)
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("calls", total=max(1, int(rps * duration_s)))
        report = _guard(
            lambda: run_loadtest(
                client,
                tool,
                payload,
                rps=rps,
                duration_s=duration_s,
                concurrency=concurrency,
                queue=queue,
                on_done=lambda done, _: progress.update(task, completed=done),
            )
        )
    client.close()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    typer.echo(
        f"{report.total_requests} calls of {tool} at {rps:g}/s target, concurrency "
        f"{concurrency}\n"
        f"success rate  {report.success_rate:.1%} ({report.failed} failed"
        + (f": {report.error_kinds}" if report.error_kinds else "")
        + ")\n"
        f"latency ms    avg {report.avg_ms:.1f}  p50 {report.p50_ms:.1f}  "
        f"p95 {report.p95_ms:.1f}  p99 {report.p99_ms:.1f}  max {report.max_ms:.1f}\n"
        f"throughput    {report.throughput_rps:.1f} calls/s over {report.elapsed_s:.1f}s"
    )


@app.command()
def bench(
    modes: Annotated[
        str,
        typer.Option(
            help="Runtime modes to measure, comma-separated: spawn, warm, spawn-cold "
            "(spawn without processes started ahead)."
        ),
    ] = "spawn,warm",
    rounds: Annotated[int, typer.Option(min=1, help="Rounds; figures are medians.")] = 3,
    calls: Annotated[int, typer.Option(min=10, help="Calls per throughput round.")] = 500,
    out: Annotated[Path, typer.Option(help="Where to write the report.")] = Path(
        "bench/RESULTS.md"
    ),
    sandbox: Annotated[
        str, typer.Option(help="runtime.sandbox for the measured worker: auto or off.")
    ] = "auto",
    profile: Annotated[
        bool | None,
        typer.Option(
            "--profile/--no-profile",
            help="Profile where a call's CPU goes (py-spy; default: if it is installed).",
        ),
    ] = None,
) -> None:
    """Benchmark tool calls against a plain Celery app's no-op task (ratios)."""
    from toolq.cli.bench import run_bench

    chosen = [mode.strip() for mode in modes.split(",") if mode.strip()]
    _guard(
        lambda: run_bench(
            modes=chosen,
            rounds=rounds,
            calls=calls,
            out=out,
            sandbox=sandbox,
            profile=profile,
            say=lambda line: typer.echo(line, err=True),
        )
    )


@app.command()
def install(
    project: Annotated[
        Path | None,
        typer.Argument(
            help="The project directory (or its compozy.yaml); default: the configured project."
        ),
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Install the project's packages (its package.json) with the Bun the workers run.

    Workers run Bun with --no-install: run this once where they run (or in the image).
    Exit 1 if Bun's install failed, 2 if there is nothing Bun could install."""
    from toolq.workers.packages import install as install_packages

    project_dir = None
    if project is not None:
        if not project.exists():
            _fail(f"{project}: no such project directory or file")
        project_dir = (project if project.is_dir() else project.parent).resolve()
        if config is None:
            own = project if project.is_file() else project_dir / "compozy.yaml"
            config = own if own.is_file() else None
    settings = _guard(lambda: load_settings(config, profile))
    target = project_dir or settings.project_dir
    done = _guard(lambda: install_packages(target, settings.runtime.bun_path))
    if done.returncode != 0:
        _fail(f"bun install in {target} failed (exit code {done.returncode})", EXIT_FAILED)


@app.command("config")
def show_config(config: ConfigOption = None, profile: ProfileOption = None) -> None:
    """Print the effective settings (after profile, file, TOOLQ_* and defaults) as JSON."""
    settings = _settings(config, profile)
    data = settings.model_dump(mode="json", by_alias=True)
    data["redis_url"] = redact_url(data["redis_url"])
    data["_source"] = settings.source
    data["_project"] = settings.project
    data["_tool_definitions"] = {
        tool_id: {
            "source": d.source,
            "description": d.description,
            "input_schema": d.input_schema is not None,
            "output_schema": d.output_schema is not None,
            "with": dict(d.defaults),
            "config": dict(d.config),
            "env": sorted(d.env),  # names only: values may be secrets or templates of them
        }
        for tool_id, d in sorted(settings.definitions.items())
    }
    typer.echo(json.dumps(data, indent=2))


@app.command()
def keygen() -> None:
    """Print a new secret key for TOOLQ_SECRET_KEY: it seals call env and signs calls
    (a worker with a key runs only signed calls; see README, "Secrets")."""
    from cryptography.fernet import Fernet

    typer.echo(Fernet.generate_key().decode())


breakers_app = typer.Typer(
    help="Circuit breakers, one per tool, shared by every worker.", no_args_is_help=False
)
app.add_typer(breakers_app, name="breakers")
dlq_app = typer.Typer(
    help="The dead-letter list: calls that failed after their last attempt.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@breakers_app.callback(invoke_without_command=True)
def breakers_list(
    ctx: typer.Context,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """List every breaker: state, failures, opened at, reopens in."""
    if ctx.invoked_subcommand is not None:
        return
    statuses = _guard(lambda: _breakers(_settings(config, profile)).statuses())
    if as_json:
        typer.echo(json.dumps([vars(status) for status in statuses], indent=2))
        return
    rows = []
    for status in statuses:
        opened = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.opened_at))
            if status.opened_at
            else "-"
        )
        reopens = f"{status.reopens_in_s:.1f}s" if status.reopens_in_s is not None else "-"
        window = f"{status.window_failures}/{status.window_calls}"
        rows.append(
            [
                status.tool_id,
                status.state,
                str(status.failures),
                window,
                str(status.trips),
                opened,
                reopens,
            ]
        )
    _print_table(
        ["tool", "state", "failures in a row", "failed/window", "trips", "opened at", "reopens in"],
        rows,
        empty="no breakers yet",
    )


@breakers_app.command("reset")
def breakers_reset(
    tool_id: Annotated[str, typer.Argument(help="The tool whose breaker to close.")],
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Close one tool's breaker now."""
    existed = _guard(lambda: _breakers(_settings(config, profile)).reset(tool_id))
    typer.echo(f"breaker for {tool_id} closed" + ("" if existed else " (it had none yet)"))


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(min=1, help="Newest N entries.")] = 50,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Show failed calls, newest first (env values are never shown)."""
    entries = _guard(lambda: _dead_letters(_settings(config, profile)).list(limit))
    for entry in entries:
        entry["env"] = {key: "***" for key in entry.get("env") or {}}
        if "env_sealed" in entry:
            entry["env_sealed"] = "(sealed)"
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    rows = []
    for entry in entries:
        error = entry.get("error") or {}
        rows.append(
            [
                entry["id"],
                entry["tool_id"],
                error.get("kind", ""),
                str(entry.get("attempts")),
                str(entry.get("retry_stopped") or "-"),
                time.strftime("%H:%M:%S", time.localtime(entry["failed_at"])),
                str(error.get("message", ""))[:200],
            ]
        )
    _print_table(
        ["id", "tool", "kind", "attempts", "stopped", "failed at", "message"],
        rows,
        empty="the dead-letter list is empty",
    )


@dlq_app.command("replay")
def dlq_replay(
    call_id: Annotated[str | None, typer.Argument(help="The failed call's id.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every entry.")] = False,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Enqueue failed calls again (fresh attempts); prints `old-id -> new-id` per call."""
    from toolq.producers import ToolClient
    from toolq.workers.deadletter import not_replayable_reason, replayable

    if (call_id is None) == (not replay_all):
        _fail("give one call id, or --all")
    settings = _settings(config, profile)
    letters = _dead_letters(settings)
    client = ToolClient(settings)
    found = _guard(lambda: letters.list() if replay_all else [letters.get(str(call_id))])
    entries = [entry for entry in found if entry is not None]
    if not replay_all and not entries:
        _fail(f"no dead-letter entry {call_id}", EXIT_FAILED)
    refused = [entry for entry in entries if not replayable(entry)]
    for entry in refused:
        typer.echo(f"toolq: cannot replay {entry['id']}: {not_replayable_reason(entry)}", err=True)
    entries = [entry for entry in entries if replayable(entry)]

    def replay(entry: dict[str, Any]) -> str:
        call = client.enqueue(
            entry["tool_id"],
            entry.get("input"),
            entry.get("env"),
            entry.get("timeout"),
            entry.get("queue"),
            config=entry.get("config"),
            sealed_env=entry.get("env_sealed"),  # passed on unopened: no key needed here
        )
        letters.remove(entry["id"])
        return call.id

    for entry in entries:
        new_id = _guard(functools.partial(replay, entry))
        typer.echo(f"{entry['id']} -> {new_id}")
    if refused:
        raise typer.Exit(EXIT_FAILED)


@dlq_app.command("purge")
def dlq_purge(config: ConfigOption = None, profile: ProfileOption = None) -> None:
    """Delete every dead-letter entry."""
    count = _guard(lambda: _dead_letters(_settings(config, profile)).purge())
    typer.echo(f"purged {count} dead-letter entries")


def _breakers(settings: Settings) -> Breakers:
    from toolq.config.connections import redis_client
    from toolq.workers.breaker import Breakers

    client = redis_client(settings, ride_out_restarts=False)
    return Breakers(client, settings.breaker_settings, settings.keys)


def _dead_letters(settings: Settings) -> DeadLetters:
    from toolq.config.connections import redis_client
    from toolq.workers.deadletter import DeadLetters

    return DeadLetters.from_settings(redis_client(settings, ride_out_restarts=False), settings)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
