"""Which Celery pool fits the seed guide's budget (10 tools at once in 512 MiB)?

Starts a real worker per pool with concurrency 10, keeps 10 slow calls running,
and samples the resident memory of the whole process tree (worker, pool
children, reapers, Bun processes). Needs a Redis (TOOLQ_REDIS_URL, else a
private one is started).

    .venv/bin/python bench/pool_memory.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from toolq.config.loader import load_settings
from toolq.devredis import drop_queue, ensure_redis
from toolq.producers.client import ToolClient
from toolq.workers.process import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tests" / "tools"


def tree_rss_mib(root_pid: int) -> tuple[float, int]:
    """Total RSS of ``root_pid`` and every process below it, and how many there are."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as statm:
                rss[int(entry)] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, count, stack = 0, 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        count += 1
        stack.extend(children.get(pid, []))
    return total / 2**20, count


def measure(pool: str, redis_url: str, config: Path) -> tuple[float, float, int]:
    settings = load_settings(config, overrides={"redis_url": redis_url, "queue": f"mem-{pool}"})
    with (
        ToolClient(settings) as client,
        WorkerProcess(
            config=config,
            redis_url=redis_url,
            queues=[f"mem-{pool}"],
            concurrency=10,
            pool=pool,
            loglevel="WARNING",
        ) as worker,
    ):
        worker.start(client.app)
        idle, _ = tree_rss_mib(worker.pid)
        calls = [client.enqueue("sleep", {"ms": 3000}, queue=f"mem-{pool}") for _ in range(10)]
        peak, peak_count = 0.0, 0
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            rss, count = tree_rss_mib(worker.pid)
            if rss > peak:
                peak, peak_count = rss, count
            time.sleep(0.1)
        for call in calls:
            assert call.result(timeout=30).ok
            call.forget()
        drop_queue(redis_url, f"mem-{pool}")
        return idle, peak, peak_count


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, ensure_redis() as redis_url:
        config = Path(tmp) / "compozy.yaml"
        config.write_text(
            f"runtime:\n  entrypoint: {TOOLS / 'entrypoint.ts'}\n  timeout: 10s\n"
            "performance:\n  max_concurrent_tools: 10\n"
        )
        print(f"{'pool':10} {'idle MiB':>9} {'10 busy MiB':>12} {'processes':>10}")
        for pool in ("threads", "prefork"):
            idle, peak, count = measure(pool, redis_url, config)
            print(f"{pool:10} {idle:9.0f} {peak:12.0f} {count:10d}")


if __name__ == "__main__":
    main()
