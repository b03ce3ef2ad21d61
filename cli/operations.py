"""Commands for running and watching a cluster: `worker`, `health` (container probes),
`flower`, `status`, `exporter` (Prometheus, for autoscaling) and `breakers`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from toolq.cli.common import (
    EXIT_FAILED,
    ConfigOption,
    JsonOption,
    ProfileOption,
    fail,
    guard,
    load,
    print_table,
)

if TYPE_CHECKING:
    from toolq.config.settings import Settings
    from toolq.workers.breaker import Breakers


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
        fail(f"--pool must be threads or prefork (got {pool!r})")
    settings = load(config, profile)
    from toolq.workers.worker import run_worker

    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    guard(
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
        fail(f"--max-age: {exc}")
    problem = check(file, ready=ready, max_age_s=max_age_s)
    if problem is not None:
        fail(problem, EXIT_FAILED)


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
    from toolq.cli import flower as flower_app

    if basic_auth_file is not None:
        try:
            basic_auth = flower_app.read_basic_auth(basic_auth_file)
        except OSError as exc:
            fail(f"--basic-auth-file: cannot read {basic_auth_file}: {exc.strerror}")
    problem = flower_app.exposure_problem(address, basic_auth)
    if problem is not None:
        fail(problem)
    flower_app.restrict_hosts(flower_app.allowed_hosts(address, allowed_host or ()))
    settings = load(config, profile)
    argv = flower_app.command_line(
        port=port, address=address, max_tasks=max_tasks, basic_auth=basic_auth
    )
    flower_app.serve(settings, argv, warn=lambda line: typer.echo(line, err=True))


def _sandbox_cell(node: dict[str, Any]) -> str:
    """Whether a worker's tools run sandboxed, as `toolq status` shows it."""
    if node.get("sandboxed") is None:
        return "?"
    if node["sandboxed"]:
        return "yes (bwrap)"
    if node.get("sandbox_mode") == "off":
        return "NO (runtime.sandbox: off)"
    return "NO (this host cannot sandbox: see the worker's log)"


def status(
    as_json: JsonOption = False,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Queues (messages and calls waiting, caps), workers with running/reserved calls and
    whether their tools run sandboxed, open breakers, dead letters, cluster-wide slots and
    rate limits."""
    from toolq.cli.status import cluster_status

    settings = load(config, profile)
    report = guard(lambda: cluster_status(settings))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    project = report["project"]
    typer.echo(f"project: {project}" if project else "project: (none: shared toolq keys)")
    print_table(
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
    print_table(
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
        print_table(
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
        print_table(
            ["tool", "rate limit", "mode", "waiting for a token"],
            [[r["tool_id"], r["rate_limit"], r["mode"], str(r["waiting"])] for r in flow["rate"]],
            empty="",
            title="rate limits",
        )


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

    settings = load(config, profile)
    try:
        interval_s = parse_duration(min_interval)
    except ValueError as exc:
        fail(f"--min-interval: {exc}")
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    guard(
        lambda: serve_forever(
            settings, port=port, address=address, queues=queue_list, min_interval_s=interval_s
        )
    )


breakers_app = typer.Typer(
    help="Circuit breakers, one per tool, shared by every worker.", no_args_is_help=False
)


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
    statuses = guard(lambda: _breakers(load(config, profile)).statuses())
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
    print_table(
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
    existed = guard(lambda: _breakers(load(config, profile)).reset(tool_id))
    typer.echo(f"breaker for {tool_id} closed" + ("" if existed else " (it had none yet)"))


def _breakers(settings: Settings) -> Breakers:
    from toolq.config.connections import redis_client
    from toolq.workers.breaker import Breakers

    client = redis_client(settings, ride_out_restarts=False)
    return Breakers(client, settings.breaker_settings, settings.keys)
