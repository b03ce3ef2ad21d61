"""How `toolq bench` drives a worker: a queue filled then drained (worker-side
throughput), a closed loop (producer included), one caller's latencies, ``map()``, slow
calls held while the worker tree's memory is read, the bare wrapper's CPU, and the order
of the subjects in each round."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from celery import Celery

from toolq.cli.bench_report import CONCURRENCY, PROJECT
from toolq.cli.devredis import drop_queue
from toolq.cli.meters import CpuMeter, tree_pss_mib, tree_rss_mib
from toolq.config.celery_app import NOOP_TASK, broker_priority
from toolq.producers.client import ToolClient
from toolq.workers.runtime.bun import WRAPPER, find_bun

READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


@dataclass
class Side:
    """How to reach one worker: its app (control, result keys), hostname and process."""

    app: Celery
    hostname: str
    pid: int
    cpu: CpuMeter


class Handle:
    def __init__(self, async_result: Any) -> None:
        self._async = async_result
        self.id = str(async_result.id)

    def result(self, timeout: float | None = None) -> Any:
        return self._async.get(timeout=timeout)


def send_task(
    app: Celery, task: str, queue: str, payload: Any = None, priority: int | None = None
) -> Handle:
    return Handle(app.send_task(task, args=[payload], queue=queue, priority=priority))


def send_noop(client: ToolClient, queue: str, payload: Any = None) -> Handle:
    """``toolq.noop`` on toolq's worker, at the broker priority a toolq call has by default.

    A raw ``send_task`` would go out at kombu's priority 0, toolq's most urgent list, which
    an idle toolq worker takes only on its next idle round (up to ~0.1 s: the reliable pop,
    workers/brokerfix.py): the noop's latency measured that wait (p50 60-100 ms), not
    toolq's settings.
    """
    return send_task(client.app, NOOP_TASK, queue, payload, priority=broker_priority(None))


def warm_up(send: Callable[[], Any]) -> None:
    for _ in range(10):
        check(send().result(timeout=60))


def run_tool(client: ToolClient, tool_id: str, queue: str) -> Any:
    return client.enqueue(tool_id, {}, queue=queue).result(timeout=60)


def check(outcome: Any) -> None:
    if hasattr(outcome, "ok") and not outcome.ok:
        raise RuntimeError(f"benchmark call failed: {outcome.error}")


def drain_throughput(
    side: Side, redis_url: str, calls: int, send: Callable[[str], Any], queue: str
) -> float:
    """Fill ``queue``, then let the worker drain it: calls per second, worker-side.

    While the worker drains, the producer only polls Redis every 50 ms (no result
    decoding), and the end is the last result's ``date_done`` as the worker stored it:
    the figure is the worker's, not the producer's (they share the machine's cores).
    """
    result_keys = [side.app.backend.get_key_for_task(send(queue).id) for _ in range(calls)]
    with redis.Redis.from_url(redis_url) as connection:
        started = time.time()
        side.app.control.add_consumer(queue, destination=[side.hostname], reply=True, timeout=5)
        deadline = time.monotonic() + 300
        while True:
            stored = connection.mget(result_keys)
            if all(stored):
                metas = [json.loads(item) for item in stored]
                if all(meta["status"] in READY for meta in metas):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not drain {calls} calls in 300 s")
            time.sleep(0.05)
        side.app.control.cancel_consumer(queue, destination=[side.hostname], reply=True, timeout=5)
        connection.delete(*result_keys)
    drop_queue(redis_url, queue)
    if any(meta["status"] != "SUCCESS" for meta in metas):
        raise RuntimeError("benchmark calls did not all succeed")
    for meta in metas:
        _check_envelope(meta["result"])
    finished = max(datetime.fromisoformat(meta["date_done"]).timestamp() for meta in metas)
    return calls / (finished - started)


def closed_loop(send: Callable[[], Any], calls: int) -> tuple[float, list[float]]:
    """Enqueue ``calls``, then collect every result (in order): calls per second, producer
    included, and each call's ms from its enqueue to its result in hand."""
    started = time.perf_counter()
    sent = []
    for _ in range(calls):
        sent.append((time.perf_counter(), send()))
    latencies = []
    for enqueued, handle in sent:
        check(handle.result(timeout=300))
        latencies.append((time.perf_counter() - enqueued) * 1000)
    return calls / (time.perf_counter() - started), latencies


def map_rate(client: ToolClient, queue: str, calls: int, chunk_size: int | None) -> float:
    """``map()`` of ``calls`` trivial calls, enqueue to the last result: calls per second."""
    started = time.perf_counter()
    results = client.map("noop", [{}] * calls, queue=queue, chunk_size=chunk_size, wait=300)
    elapsed = time.perf_counter() - started
    if not all(result.ok for result in results):
        raise RuntimeError("benchmark calls did not all succeed")
    return calls / elapsed


def rotated(items: tuple[str, ...], round_no: int) -> tuple[str, ...]:
    """The subjects in round ``round_no``'s order (1-based): each takes the lead in turn."""
    shift = (round_no - 1) % len(items)
    return items[shift:] + items[:shift]


def _check_envelope(result: Any) -> None:
    if isinstance(result, dict) and result.get("status") == "error":
        raise RuntimeError(f"benchmark call failed: {result.get('error')}")


def one_caller(send: Callable[[], Any], count: int, every_s: float = 0.0) -> list[float]:
    """One caller's ``count`` calls, enqueue to result, ms; ``every_s``: a call starts at
    most that often (paced), else each as soon as the last one ended (back to back)."""
    values = []
    due = time.perf_counter()
    for _ in range(count):
        time.sleep(max(0.0, due - time.perf_counter()))
        started = time.perf_counter()
        due = started + every_s
        outcome = send().result(timeout=300)
        values.append((time.perf_counter() - started) * 1000)
        check(outcome)
    return values


def peak_memory_while_busy(
    client: ToolClient,
    queue: str,
    worker_pid: int,
    calls_at_once: int = CONCURRENCY,
    ms: int = 2000,
) -> tuple[float, float]:
    """Peak RSS and peak PSS (MiB) of the worker tree while ``calls_at_once`` slow calls
    run."""
    calls = [client.enqueue("sleep", {"ms": ms}, queue=queue) for _ in range(calls_at_once)]
    peak_rss = peak_pss = 0.0
    deadline = time.monotonic() + ms / 1000 * 0.9
    while time.monotonic() < deadline:
        peak_rss = max(peak_rss, tree_rss_mib(worker_pid))
        peak_pss = max(peak_pss, tree_pss_mib(worker_pid))
        time.sleep(0.05)
    for call in calls:
        check(call.result(timeout=60))
    return peak_rss, peak_pss


NOOP_REQUEST = json.dumps(
    {"tool_id": "noop", "tool_exec_id": "bench", "input": {}, "config": {}, "env": {},
     "timeout_ms": 30000, "nonce": "n"}
).encode()  # fmt: skip
"""A spawn-mode request for the bench project's no-op tool, as the runner writes it."""


def wrapper_cpu_ms(runs: int = 100) -> float:
    """CPU per run of the wrapper started with Bun directly, one trivial call each."""
    bun = find_bun(None, PROJECT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        read_fd, write_fd = os.pipe()
        proc = subprocess.Popen(
            [
                str(bun),
                "--smol",
                "--no-install",
                "--no-env-file",
                str(WRAPPER),
                str(PROJECT / "entrypoint.ts"),
                str(write_fd),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            cwd=PROJECT,
        )
        os.close(write_fd)
        proc.communicate(NOOP_REQUEST)
        while os.read(read_fd, 65536):
            pass
        os.close(read_fd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return used * 1000 / runs
