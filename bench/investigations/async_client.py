"""AsyncToolClient at scale (issue 24): many awaits on one client, and closed-loop
throughput against ToolClient with threads, on the same worker.

1. **5,000 concurrent awaits** from one event loop on one client. First the calls sit
   in a queue no worker reads: every waiter subscribed, the memory per waiting call is
   measured (tracemalloc: Python allocations; RSS: the process), then the calls are
   cancelled and every waiter must receive its ``cancelled`` result through pub/sub.
   Then 5,000 ``await client.run(...)`` at once against the worker, each checked against
   its own input. The client's sockets are sampled every 10 ms all along (this process's
   open sockets less those open before the client was made).
2. **Closed loop**: ``--concurrency`` callers each run calls back to back, ``--calls`` in
   all: asyncio tasks on one AsyncToolClient, then threads on one ToolClient, alternated
   ``--rounds`` times against the same worker (calls/s; the ratio of the medians).

    .venv/bin/python bench/investigations/async_client.py [--waiters 5000] [--calls 2000]
        [--concurrency 32] [--rounds 3] [--redis-url redis://127.0.0.1:6379]

It claims an empty database of that Redis (15 down to 1), flushed afterwards, and
starts one worker on the bench project (its ``echo_size`` tool, warm mode, 10 slots).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from toolq import AsyncToolClient, ToolClient
from toolq.cli.devredis import scratch_database
from toolq.config.loader import load_settings
from toolq.config.settings import Settings
from toolq.workers.process import WorkerProcess

PROJECT = Path(__file__).resolve().parents[2] / "cli" / "projects" / "bench"
CONFIG = PROJECT / "compozy.yaml"
TOOL = "echo_size"


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class SocketSampler:
    """This process's sockets above a baseline, every 10 ms, in a task of the loop."""

    def __init__(self) -> None:
        self.baseline = open_sockets()
        self.seen: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.seen.add(open_sockets() - self.baseline)
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def many_awaits(settings: Settings, waiters: int, queue: str) -> dict[str, Any]:
    sampler = SocketSampler()
    sampler.start()
    report: dict[str, Any] = {}
    async with AsyncToolClient(settings) as client:
        # (a) waiting: calls no worker takes, every waiter subscribed
        idle = f"{queue}-idle"
        calls = await client.enqueue_many(TOOL, [{"data": ""}] * waiters, queue=idle)
        await client.run(TOOL, {"data": "warm"}, queue=queue, wait=60)  # warm the client
        rss_before = rss_kib()
        tracemalloc.start()
        traced_before = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.ensure_future(call.result(timeout=300)) for call in calls]
        while client.waiting < waiters:
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # every subscription confirmed, every key read once
        traced = tracemalloc.get_traced_memory()[0] - traced_before
        tracemalloc.stop()
        rss = rss_kib() - rss_before
        report["bytes_per_waiting_call_traced"] = traced / waiters
        report["bytes_per_waiting_call_rss"] = rss * 1024 / waiters
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(client.cancel(call.id, TOOL) for call in calls))
        results = await asyncio.gather(*tasks)
        report["cancel_and_deliver_s"] = time.perf_counter() - started
        report["cancelled_delivered"] = sum(
            r.error is not None and r.error.kind == "cancelled" for r in results
        )
        assert outcomes.count("cancelled") == waiters, "every idle call was cancelled"
        # (b) 5,000 runs at once against the worker, each checked against its input
        started = time.perf_counter()
        ran = await asyncio.gather(
            *(client.run(TOOL, {"data": "x" * (i % 500)}, queue=queue) for i in range(waiters))
        )
        report["runs_s"] = time.perf_counter() - started
        report["runs_correct"] = sum(
            r.ok and r.result == {"length": i % 500} for i, r in enumerate(ran)
        )
    await sampler.stop()
    report["client_sockets_seen"] = sorted(sampler.seen)
    return report


async def async_closed_loop(settings: Settings, calls: int, concurrency: int, queue: str) -> float:
    async with AsyncToolClient(settings) as client:
        await client.run(TOOL, {"data": "warm"}, queue=queue, wait=60)
        left = calls

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                result = await client.run(TOOL, {"data": "abc"}, queue=queue, wait=120)
                assert result.ok, result.error

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return calls / (time.perf_counter() - started)


def sync_closed_loop(client: ToolClient, calls: int, concurrency: int, queue: str) -> float:
    client.run(TOOL, {"data": "warm"}, queue=queue, wait=60)

    def one(_: int) -> None:
        result = client.run(TOOL, {"data": "abc"}, queue=queue, wait=120)
        assert result.ok, result.error

    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        list(pool.map(one, range(calls)))
        return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    args = parser.parse_args()
    with scratch_database(args.redis_url, "bench") as url:
        settings = load_settings(CONFIG, environ={}, overrides={"redis_url": url})
        queue = f"bench-async-{uuid.uuid4().hex[:6]}"
        with (
            ToolClient(settings) as sync,
            WorkerProcess(config=CONFIG, redis_url=url, queues=[queue]) as worker,
        ):
            worker.start(sync.app)
            report = asyncio.run(many_awaits(settings, args.waiters, queue))
            print(f"{args.waiters} concurrent awaits on one AsyncToolClient:")
            print(f"  client sockets seen (sampled every 10 ms): {report['client_sockets_seen']}")
            print(
                "  memory per waiting call: "
                f"{report['bytes_per_waiting_call_traced']:.0f} B (tracemalloc), "
                f"{report['bytes_per_waiting_call_rss']:.0f} B (RSS)"
            )
            print(
                f"  cancelled and delivered through pub/sub: {report['cancelled_delivered']}"
                f"/{args.waiters} in {report['cancel_and_deliver_s']:.2f} s"
            )
            print(
                f"  run() at once against the worker: {report['runs_correct']}/{args.waiters}"
                f" correct in {report['runs_s']:.2f} s"
            )
            rates: dict[str, list[float]] = {"async": [], "sync": []}
            for _ in range(args.rounds):
                rates["async"].append(
                    asyncio.run(async_closed_loop(settings, args.calls, args.concurrency, queue))
                )
                rates["sync"].append(sync_closed_loop(sync, args.calls, args.concurrency, queue))
            print(
                f"closed loop, {args.concurrency} callers, {args.calls} calls, "
                f"{args.rounds} rounds alternated:"
            )
            for name, values in rates.items():
                shown = ", ".join(f"{v:.0f}" for v in values)
                print(f"  {name}: {shown} calls/s (median {statistics.median(values):.0f})")
            ratio = statistics.median(rates["async"]) / statistics.median(rates["sync"])
            print(f"  async / sync (threads): {ratio:.2f}x")


if __name__ == "__main__":
    main()
