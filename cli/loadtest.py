"""`toolq loadtest`: pace calls at a target rate against a running cluster and report.

Latency is measured from the moment a call was *scheduled* to be sent, not from when
a free client thread got to it, so a saturated cluster shows up as latency instead of
being hidden (no coordinated omission). Requests are bounded: ``rps * duration``
calls at most, at most ``concurrency`` outstanding.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from toolq.producers.client import ToolClient


@dataclass(frozen=True)
class LoadReport:
    tool_id: str
    target_rps: float
    duration_s: float
    concurrency: int
    total_requests: int
    succeeded: int
    failed: int
    success_rate: float
    avg_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    elapsed_s: float
    throughput_rps: float
    error_kinds: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def run_loadtest(
    client: ToolClient,
    tool_id: str,
    payload: Any,
    *,
    rps: float,
    duration_s: float,
    concurrency: int,
    queue: str | None = None,
    wait_s: float = 120.0,
    on_done: Callable[[int, int], None] | None = None,
) -> LoadReport:
    """Send ``rps * duration_s`` calls at a steady pace; return the report."""
    total = max(1, int(rps * duration_s))
    latencies: list[float] = []
    kinds: dict[str, int] = {}
    lock = threading.Lock()
    done = 0

    def one(scheduled: float) -> None:
        nonlocal done
        kind = "ok"
        try:
            result = client.run(tool_id, payload, queue=queue, wait=wait_s)
            if result.error is not None:
                kind = result.error.kind
        except Exception as exc:  # a load test reports errors, it does not stop on them
            kind = type(exc).__name__
        elapsed = time.perf_counter() - scheduled
        with lock:
            latencies.append(elapsed)
            kinds[kind] = kinds.get(kind, 0) + 1
            done += 1
            if on_done is not None:
                on_done(done, total)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="loadtest") as pool:
        for i in range(total):
            scheduled = started + i / rps
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, scheduled)
    elapsed = time.perf_counter() - started

    ordered = sorted(latencies)
    succeeded = kinds.pop("ok", 0)
    failed = sum(kinds.values())
    return LoadReport(
        tool_id=tool_id,
        target_rps=rps,
        duration_s=duration_s,
        concurrency=concurrency,
        total_requests=total,
        succeeded=succeeded,
        failed=failed,
        success_rate=succeeded / total,
        avg_ms=1000 * sum(ordered) / len(ordered),
        p50_ms=1000 * percentile(ordered, 50),
        p95_ms=1000 * percentile(ordered, 95),
        p99_ms=1000 * percentile(ordered, 99),
        max_ms=1000 * ordered[-1],
        elapsed_s=elapsed,
        throughput_rps=total / elapsed,
        error_kinds=kinds,
    )
