"""Prometheus metrics of a worker, named after Compozy's runtime where Compozy has one.

Each worker process serves ``/metrics`` on its own port (``performance.metrics_port``,
or the next free one: several workers on one host each get theirs). With the
``prefork`` pool, ``toolq worker`` sets ``PROMETHEUS_MULTIPROC_DIR`` before this module
is imported: pool processes write their samples there and the main process serves
the sum.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

log = logging.getLogger("toolq.worker")

EXECUTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BYTES_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 10485760)
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}

TOOL_EXECUTE_SECONDS = Histogram(
    "compozy_runtime_tool_execute_seconds",
    "Time to run one tool call in Bun (spawn to result).",
    ["tool_id", "outcome"],
    buckets=EXECUTE_BUCKETS,
)
TOOL_ERRORS = Counter(
    "compozy_runtime_tool_errors_total", "Failed tool attempts by kind.", ["tool_id", "error_kind"]
)
TOOL_TIMEOUTS = Counter(
    "compozy_runtime_tool_timeouts_total", "Tool attempts that hit their time limit.", ["tool_id"]
)
BUN_EXITS = Counter(
    "compozy_runtime_bun_process_exits_total",
    "Bun process exits: status ok|error, exit code, signal name.",
    ["status", "code", "signal"],
)
TOOL_OUTPUT_BYTES = Histogram(
    "compozy_runtime_tool_output_bytes",
    "Size of a tool's result envelope.",
    ["tool_id"],
    buckets=BYTES_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "toolq_queue_wait_seconds",
    "Time from first enqueue to the start of the first attempt.",
    ["tool_id"],
    buckets=EXECUTE_BUCKETS,
)
RETRIES = Counter(
    "toolq_retries_total", "Attempts scheduled again after a failure.", ["tool_id", "error_kind"]
)
DEFERRALS = Counter(
    "toolq_breaker_deferrals_total", "Calls deferred because their breaker was open.", ["tool_id"]
)
DEAD_LETTERS = Counter(
    "toolq_dead_letters_total", "Calls that ended in failure (dead-lettered).", ["tool_id"]
)
BREAKER_STATE = Gauge(
    "toolq_breaker_state",
    "Last breaker state this worker saw: 0 closed, 1 half-open, 2 open.",
    ["tool_id"],
    multiprocess_mode="max",
)
TOOLS_RUNNING = Gauge(
    "toolq_tools_running", "Tool calls running in Bun now.", multiprocess_mode="livesum"
)


@contextmanager
def running() -> Iterator[None]:
    TOOLS_RUNNING.inc()
    try:
        yield
    finally:
        TOOLS_RUNNING.dec()


def observe_breaker(tool_id: str, state: str) -> None:
    if state in BREAKER_STATES:
        BREAKER_STATE.labels(tool_id).set(BREAKER_STATES[state])


def serve(first_port: int) -> int:
    """Serve /metrics on the first free port from ``first_port``; returns the port."""
    registry = None
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    for port in range(first_port, first_port + 50) if first_port else [0]:
        try:
            if registry is None:
                server, _ = start_http_server(port)
            else:
                server, _ = start_http_server(port, registry=registry)
        except OSError:
            continue
        chosen = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", socket.gethostname(), chosen)
        return chosen
    raise OSError(f"no free port for metrics in {first_port}..{first_port + 49}")
