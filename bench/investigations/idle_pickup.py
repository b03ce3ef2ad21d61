"""How fast an idle worker takes a call, by priority (issue 31's reliable pop).

    .venv/bin/python bench/investigations/idle_pickup.py [--calls 100]

One worker on the test tools; ``--calls`` sequential ``echo`` calls with the default
priority, then with priority 9, each sent 150 ms after the last ended (so the worker is
idle, waiting, when it comes); prints p50/p95 of each (enqueue to result) and the idle
worker's CPU over 20 s. An idle worker waits on its default-priority list; a call on
another list is taken at its next pop (``workers/brokerfix.py``, ``IDLE_WAIT_S``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from toolq import ToolClient  # noqa: E402
from toolq.cli.devredis import ensure_redis, scratch_database  # noqa: E402
from toolq.config.loader import load_settings  # noqa: E402
from toolq.workers.process import WorkerProcess  # noqa: E402

CONFIG = ROOT / "tests" / "tools" / "compozy.yaml"


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    report: dict[str, float] = {}
    with ensure_redis(None) as base, scratch_database(base, "bench-idle-pickup") as url:
        settings = load_settings(CONFIG, environ={}, overrides={"redis_url": url})
        with ToolClient(settings) as client, WorkerProcess(config=CONFIG, redis_url=url) as w:
            w.start(client.app)
            for _ in range(20):  # warm up
                client.run("echo", {}, wait=30)
            for priority in (0, 9):
                latencies = []
                for _ in range(args.calls):
                    began = time.perf_counter()
                    assert client.run("echo", {}, wait=30, priority=priority or None).ok
                    latencies.append((time.perf_counter() - began) * 1000)
                    time.sleep(0.15)
                latencies.sort()
                report[f"priority_{priority}_p50_ms"] = round(statistics.median(latencies), 2)
                report[f"priority_{priority}_p95_ms"] = round(
                    latencies[int(len(latencies) * 0.95) - 1], 2
                )
            before = cpu_s(w.pid)
            time.sleep(20)
            report["idle_worker_cpu_pct"] = round((cpu_s(w.pid) - before) / 20 * 100, 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
