"""Prometheus metrics of a worker, named after Compozy's runtime where Compozy has one.

Each worker process serves ``/metrics`` on its own port (``performance.metrics_port``,
or the next free one: several workers on one host each get theirs). With the
``prefork`` pool, the worker sets up ``PROMETHEUS_MULTIPROC_DIR`` before it builds its
metrics (:func:`use_multiprocess_dir`): pool processes write their samples there and the
main process serves the sum.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

from toolq.workers.runtime.base import Outcome

log = logging.getLogger("toolq.worker")

EXECUTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BYTES_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 10485760)
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}


class Metrics:
    """A worker's metrics, built at worker boot (never at import) into ``registry``.

    Policy tests build one over a registry of their own; a worker builds one per
    process (with prefork, metrics write to the multiprocess directory).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.tool_execute_seconds = Histogram(
            "compozy_runtime_tool_execute_seconds",
            "Time to run one tool call in Bun (spawn to result).",
            ["tool_id", "outcome"],
            buckets=EXECUTE_BUCKETS,
            registry=registry,
        )
        self.tool_errors = Counter(
            "compozy_runtime_tool_errors_total",
            "Failed tool attempts by kind.",
            ["tool_id", "error_kind"],
            registry=registry,
        )
        self.tool_timeouts = Counter(
            "compozy_runtime_tool_timeouts_total",
            "Tool attempts that hit their time limit.",
            ["tool_id"],
            registry=registry,
        )
        self.bun_exits = Counter(
            "compozy_runtime_bun_process_exits_total",
            "Bun process exits: status ok|error, exit code, signal name.",
            ["status", "code", "signal"],
            registry=registry,
        )
        self.tool_output_bytes = Histogram(
            "compozy_runtime_tool_output_bytes",
            "Size of a tool's result envelope.",
            ["tool_id"],
            buckets=BYTES_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "toolq_queue_wait_seconds",
            "Time from first enqueue to the start of the first attempt.",
            ["tool_id"],
            buckets=EXECUTE_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "toolq_retries_total",
            "Attempts scheduled again after a failure.",
            ["tool_id", "error_kind"],
            registry=registry,
        )
        self.deferrals = Counter(
            "toolq_breaker_deferrals_total",
            "Calls deferred because their breaker was open.",
            ["tool_id"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "toolq_dead_letters_total",
            "Calls that ended in failure (dead-lettered).",
            ["tool_id"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "toolq_breaker_state",
            "Last breaker state this worker saw: 0 closed, 1 half-open, 2 open.",
            ["tool_id"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.tools_running = Gauge(
            "toolq_tools_running",
            "Tool calls running in Bun now.",
            multiprocess_mode="livesum",
            registry=registry,
        )

        self.slots_in_use = Gauge(
            "toolq_slots_in_use",
            "Cluster-wide slots of a capped tool in use, as this worker last saw them.",
            ["tool_id"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.waiting_calls = Gauge(
            "toolq_waiting_calls",
            "Calls waiting for a slot or a rate token, as this worker last saw them.",
            ["tool_id", "reason"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.rate_limited = Counter(
            "toolq_rate_limited_total",
            "Calls over their tool's rate limit: queued (re-published) or rejected.",
            ["tool_id", "action"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "toolq_cache_hits_total",
            "Calls answered from the tool's result cache, without running Bun.",
            ["tool_id"],
            registry=registry,
        )

    @contextmanager
    def running(self) -> Iterator[None]:
        self.tools_running.inc()
        try:
            yield
        finally:
            self.tools_running.dec()

    def observe_breaker(self, tool_id: str, state: str) -> None:
        if state in BREAKER_STATES:
            self.breaker_state.labels(tool_id).set(BREAKER_STATES[state])

    def observe_run(self, tool_id: str, outcome: Outcome) -> None:
        """One Bun run: its time, size, error kind and how the process exited."""
        kind = outcome.kind
        label = "success" if kind is None else "timeout" if kind == "timeout" else "error"
        self.tool_execute_seconds.labels(tool_id, label).observe(outcome.total_time_ms / 1000)
        self.tool_output_bytes.labels(tool_id).observe(outcome.output_bytes)
        if kind is not None:
            self.tool_errors.labels(tool_id, kind).inc()
        if kind == "timeout":
            self.tool_timeouts.labels(tool_id).inc()
        if outcome.exit_code is not None or outcome.exit_signal is not None:
            status = "ok" if outcome.exit_code == 0 else "error"
            code = "" if outcome.exit_code is None else str(outcome.exit_code)
            self.bun_exits.labels(status, code, outcome.exit_signal or "").inc()


def use_multiprocess_dir() -> None:
    """Prefork: pool processes write samples to a shared directory and the main process
    serves their sum. prometheus_client picks its value store when it is imported, so
    after setting the directory it is asked to pick again."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="toolq-metrics-")
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def serve(first_port: int, metrics: Metrics) -> int:
    """Serve /metrics on the first free port from ``first_port``; returns the port."""
    registry = metrics.registry
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    for port in range(first_port, first_port + 50) if first_port else [0]:
        try:
            server, _ = start_http_server(port, registry=registry)
        except OSError:
            continue
        chosen = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", socket.gethostname(), chosen)
        return chosen
    raise OSError(f"no free port for metrics in {first_port}..{first_port + 49}")
