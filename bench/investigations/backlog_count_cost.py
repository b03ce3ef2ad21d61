"""What counting a queue's backlog costs Redis (toolq exporter, toolq status; issue 23).

    .venv/bin/python bench/investigations/backlog_count_cost.py [--messages 100000]

Fills one priority list of a scratch database with copies of real messages (one chunk
of 100 calls for every 99 single calls), then counts it as the exporter does
(toolq.cli.backlog.count_list: a Lua script per window of 1,000 messages) and prints the
whole count's time, the longest single script call (the most Redis is held at once,
round trip included), the queue's age read (ten LINDEX), and the lengths it found.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import redis

from toolq.cli.backlog import _COUNT, WINDOW, count_list, enqueued_at
from toolq.cli.devredis import ensure_redis, scratch_database
from toolq.config.celery_app import queue_lists
from toolq.config.loader import load_settings
from toolq.producers.client import ToolClient

TOOLS = Path(__file__).resolve().parents[2] / "tests" / "tools" / "compozy.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    with ensure_redis(None) as base, scratch_database(base, "backlog-bench") as url:
        queue = "bench-backlog"
        settings = load_settings(TOOLS, environ={}, overrides={"redis_url": url, "queue": queue})
        with ToolClient(settings) as client:
            client.enqueue("echo", {"n": 1})
            client.enqueue_many("echo", [{"n": n} for n in range(100)], chunk_size=100)
        plain = redis.Redis.from_url(url)
        name = queue_lists(queue)[9]
        chunk, single = plain.lrange(name, 0, 1)  # newest first: the chunk, then the call
        plain.delete(name)
        with plain.pipeline(transaction=False) as pipe:
            for i in range(args.messages):
                pipe.lpush(name, chunk if i % 100 == 99 else single)
                if i % 10_000 == 9_999:
                    pipe.execute()
            pipe.execute()
        chunks = args.messages // 100
        expected = (args.messages - chunks) + 100 * chunks
        script = plain.register_script(_COUNT)  # the script count_list runs
        longest = 0.0
        for start in range(0, args.messages, WINDOW):
            began = time.perf_counter()
            script(keys=[name], args=[start, start + WINDOW - 1])
            longest = max(longest, time.perf_counter() - began)
        began = time.perf_counter()
        messages, calls, exact = count_list(plain, name)
        whole = time.perf_counter() - began
        began = time.perf_counter()
        for each in queue_lists(queue):
            enqueued_at(plain.lindex(each, -1))
        age = time.perf_counter() - began
        size = plain.memory_usage(name) or 0
        plain.delete(name)
        plain.close()
    assert (messages, calls, exact) == (args.messages, expected, True)
    print(
        f"{messages:,} messages ({calls:,} calls, {size / 2**20:.0f} MiB in Redis): "
        f"count {whole * 1000:.0f} ms, longest window of {WINDOW:,} {longest * 1000:.1f} ms, "
        f"oldest-call age {age * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
