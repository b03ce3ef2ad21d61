"""What flow control adds to one call (docs/flow-control.md).

Builds four workers in this process on the bench project's ``noop`` tool — no flow
control, ``max_concurrency``, ``rate_limit``, both — and sends calls straight to their
handlers (no queue), interleaved so all four see the same machine load. For each it
prints the Redis commands the handler sent per call (counted at the client, like
``redis-cli MONITOR`` for this process only: other users of a shared Redis do not
blur it) and the median handler time, as a ratio to the tool without flow control.

    .venv/bin/python bench/investigations/flow_cost.py [--calls 300] [--redis-url redis://127.0.0.1:6379]

It claims an empty database of that Redis (15 down to 1) and flushes it afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from toolq.cli.devredis import scratch_database
from toolq.cli.meters import count_commands
from toolq.config.loader import load_settings
from toolq.workers.assembly import WorkerParts, build_worker
from toolq.workers.call.attempt import Delivery, Final

PROJECT = Path(__file__).resolve().parents[2] / "cli" / "projects" / "bench"
SETUPS: dict[str, dict[str, Any]] = {
    "none": {},
    "max_concurrency": {"max_concurrency": 1000},
    "rate_limit": {"rate_limit": "1000000/s"},
    "both": {"max_concurrency": 1000, "rate_limit": "1000000/s"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    args = parser.parse_args()
    with scratch_database(args.redis_url, "bench") as url:
        measure(url, args.calls)


def measure(url: str, calls: int) -> None:
    workers: dict[str, WorkerParts] = {}
    try:
        for name, tool in SETUPS.items():
            settings = load_settings(
                PROJECT / "compozy.yaml",
                environ={},
                overrides={"redis_url": url, "tools": {"noop": tool} if tool else {}},
            )
            workers[name] = build_worker(settings, max_concurrent=1)
        sent = {name: count_commands(parts) for name, parts in workers.items()}
        times: dict[str, list[float]] = {name: [] for name in workers}
        for i in range(calls + 10):
            for name, parts in workers.items():
                message = {"tool_id": "noop", "input": {}, "enqueued_at": time.time()}
                started = time.perf_counter()
                decision = parts.handler.handle(message, Delivery(f"{name}-{i}", "bench"))
                elapsed = (time.perf_counter() - started) * 1000
                assert isinstance(decision, Final) and not decision.envelope["error"], decision
                if i >= 10:  # the first calls warm the Bun processes up
                    times[name].append(elapsed)
        base = statistics.median(times["none"])
        print(f"{'flow control':16} {'redis cmds/call':>16} {'median ms':>10} {'ratio':>6}")
        for name in workers:
            per_call = len(sent[name]) / (calls + 10)
            median = statistics.median(times[name])
            print(f"{name:16} {per_call:16.2f} {median:10.3f} {median / base:6.2f}")
        kinds = sorted(set(sent["both"]))
        print(f"commands sent with both: {', '.join(kinds) or 'none'}")
    finally:
        for parts in workers.values():
            parts.close()


if __name__ == "__main__":
    main()
