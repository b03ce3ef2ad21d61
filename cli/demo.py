"""`toolq demo`: a worker on the example project, a batch of calls, a table of outcomes."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from toolq.cli.devredis import drop_queue, ensure_redis
from toolq.config.loader import load_settings
from toolq.envelope import ToolResult
from toolq.errors import ConfigError
from toolq.producers.call import ToolCall
from toolq.producers.client import ToolClient
from toolq.workers.process import WorkerProcess

EXAMPLE_PROJECT = Path(__file__).resolve().parent / "projects" / "weather"
"""Shipped inside the package, so `toolq demo` works from an installed wheel too."""

BATCH: list[tuple[str, Any, dict[str, str] | None]] = [
    ("weather", {"city": "Lisbon"}, None),
    ("weather", {"city": "Oslo"}, None),
    ("weather", {"city": "Nairobi"}, None),
    ("slugify", {"text": "Héllo, Wörld of Tools!"}, None),
    ("sum", {"numbers": [3, 5, 8, 13]}, None),
    ("greet", {"name": "Ada"}, {"GREETER": "the demo"}),
    ("weather", {}, None),  # the tool throws: "Invalid city parameter"
    ("slow_report", {"ms": 5000}, None),  # over its 1s timeout
    ("forecast", {"city": "Paris"}, None),  # no such tool
]


def run_demo(project: Path | None = None) -> int:
    """Run the demo end to end; returns the process exit code."""
    console = Console()
    project = (project or EXAMPLE_PROJECT).resolve()
    config = project / "compozy.yaml"
    if not config.is_file():
        raise ConfigError(f"{config}: no compozy.yaml in the demo project", source=str(config))
    with ensure_redis() as redis_url:
        queue = f"toolq-demo-{uuid.uuid4().hex[:8]}"  # a private queue: no other worker steals
        settings = load_settings(config, overrides={"redis_url": redis_url, "queue": queue})
        client = ToolClient(settings)
        console.print(f"[bold]toolq demo[/] — project {project}")
        with WorkerProcess(config=config, redis_url=redis_url, queues=[queue]) as worker:
            with console.status("starting a worker…"):
                worker.start(client.app)
            console.print(
                f"worker [cyan]{worker.hostname}[/] is up (threads pool, "
                f"{settings.performance.max_concurrent_tools} tools at once)"
            )
            calls = _enqueue_batch(client)
            results = _wait_for(calls, console)
            with console.status("stopping the worker…"):
                worker.stop()
        _clean_up(client, queue, calls)
    console.print(_table(results))
    failed = [r for r, _ in results if not r.ok]
    expected_failures = {"tool_error", "timeout", "not_found"}
    unexpected = [r for r in failed if r.error and r.error.kind not in expected_failures]
    console.print(
        f"{len(results) - len(failed)} succeeded, {len(failed)} failed as intended "
        "(a thrown error, a timeout, an unknown tool)."
        if not unexpected
        else f"[red]{len(unexpected)} call(s) failed unexpectedly[/]"
    )
    return 1 if unexpected else 0


def _enqueue_batch(client: ToolClient) -> list[tuple[ToolCall, Any]]:
    return [(client.enqueue(tool, payload, env), payload) for tool, payload, env in BATCH]


def _wait_for(calls: list[tuple[ToolCall, Any]], console: Console) -> list[tuple[ToolResult, Any]]:
    done: dict[str, ToolResult] = {}
    columns = (
        TextColumn("running the batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("batch", total=len(calls))
        while len(done) < len(calls):
            for call, _ in calls:
                if call.id not in done and call.ready():
                    done[call.id] = call.result()
                    progress.advance(task)
            time.sleep(0.05)
    return [(done[call.id], payload) for call, payload in calls]


def _clean_up(client: ToolClient, queue: str, calls: list[tuple[ToolCall, Any]]) -> None:
    """Leave the user's Redis as the demo found it: no results, no private queue."""
    for call, _ in calls:
        call.forget()
    drop_queue(client.settings.redis_url, queue)
    client.close()


def _table(results: list[tuple[ToolResult, Any]]) -> Table:
    table = Table(title="outcomes", show_lines=False)
    for column in ("tool", "input", "status", "result / error"):
        table.add_column(column)
    table.add_column("ms", justify="right")
    for result, payload in results:
        if result.ok:
            status, detail = "[green]success[/]", _compact(result.result)
        else:
            assert result.error is not None
            status = f"[red]{result.error.kind}[/]"
            detail = result.error.message
        table.add_row(
            result.tool_id,
            _shorten(_compact(payload), 18),
            status,
            _shorten(detail, 34),
            str(result.metadata.get("total_time", "")),
        )
    return table


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
