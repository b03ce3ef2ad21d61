"""Commands for trying and measuring toolq: `demo`, `loadtest` (against a running
cluster) and `bench` (toolq against a plain Celery app, `make bench`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from toolq.cli.common import (
    ConfigOption,
    InputOption,
    ProfileOption,
    QueueOption,
    fail,
    guard,
    load,
    parse_input,
)


def demo(
    project: Annotated[
        Path | None,
        typer.Option(help="A Compozy tool project (default: the weather project in toolq)."),
    ] = None,
) -> None:
    """Start a worker on the example project, run a batch of calls, show the outcomes."""
    from toolq.cli.demo import run_demo

    raise typer.Exit(guard(lambda: run_demo(project)))


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
        fail(f"--duration: {exc}")
    settings = load(config, profile)
    payload = parse_input(input)
    client = ToolClient(settings)
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("calls", total=max(1, int(rps * duration_s)))
        report = guard(
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


def bench(
    modes: Annotated[
        str,
        typer.Option(
            help="Runtime modes to measure, comma-separated: spawn, warm, spawn-cold "
            "(spawn without processes started ahead)."
        ),
    ] = "spawn,warm",
    rounds: Annotated[
        int, typer.Option(min=1, help="Interleaved rounds; figures are their medians.")
    ] = 5,
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
    busy_core: Annotated[
        bool,
        typer.Option(
            "--busy-core",
            help="Keep one core busy with another process during the run (CI-like load).",
        ),
    ] = False,
) -> None:
    """Benchmark tool calls against a plain Celery app's no-op task (ratios)."""
    from toolq.cli.bench import run_bench

    chosen = [mode.strip() for mode in modes.split(",") if mode.strip()]
    guard(
        lambda: run_bench(
            modes=chosen,
            rounds=rounds,
            calls=calls,
            out=out,
            sandbox=sandbox,
            profile=profile,
            busy_core=busy_core,
            say=lambda line: typer.echo(line, err=True),
        )
    )
