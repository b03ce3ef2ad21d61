"""Which Celery pool fits the seed guide's budget (10 tools at once in 512 MiB)?

Starts a real worker per pool with concurrency 10, keeps 10 slow calls running,
and samples the resident memory of the whole process tree (worker, pool children,
reapers, Bun processes). Needs a Redis (TOOLQ_REDIS_URL, else a private one).

    .venv/bin/python bench/investigations/pool_memory.py [--mode warm|spawn]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from toolq.cli.bench import bench_worker
from toolq.cli.bench_loops import peak_memory_while_busy
from toolq.cli.devredis import ensure_redis, scratch_database
from toolq.cli.meters import tree_rss_mib

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "cli" / "projects" / "bench"


def measure(pool: str, mode: str, redis_url: str, config: Path) -> tuple[float, float]:
    queue = f"mem-{pool}"
    env = {"TOOLQ_RUNTIME__MODE": mode}
    with bench_worker(config, redis_url, queue, env, concurrency=10, pool=pool) as (
        client,
        worker,
    ):
        time.sleep(1.0)  # let a warm pool fill
        idle = tree_rss_mib(worker.pid)
        peak = peak_memory_while_busy(client, queue, worker.pid, calls_at_once=10, ms=3000)[0]
    return idle, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="spawn", choices=["spawn", "warm"])
    args = parser.parse_args()
    with ensure_redis() as base_url, scratch_database(base_url, "bench") as redis_url:
        config = TOOLS / "compozy.yaml"  # 10 slots; the entrypoint must be in its project
        print(f"mode {args.mode}\n{'pool':10} {'idle MiB':>9} {'10 busy MiB':>12}")
        for pool in ("threads", "prefork"):
            idle, peak = measure(pool, args.mode, redis_url, config)
            print(f"{pool:10} {idle:9.0f} {peak:12.0f}")


if __name__ == "__main__":
    main()
