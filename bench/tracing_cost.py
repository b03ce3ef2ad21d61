"""What OpenTelemetry tracing costs (issue 27): warm closed-loop throughput, tracing off
against tracing on (every span sampled, ratio 1.0), in one run on the same machine.

Off: no ``OTEL_*`` variable; toolq imports nothing of OpenTelemetry. On: the producer
(this process) and the worker both export every span, batched, as JSON lines to a file
(``OTEL_TRACES_FILE``). Each round starts a fresh worker for each mode (warm, the bench
project's ``echo_size``), warms it up, then ``--concurrency`` threads run ``--calls``
calls back to back; modes alternate ``--rounds`` times; the medians are compared.

    .venv/bin/python bench/tracing_cost.py [--calls 600] [--concurrency 8] [--rounds 3]
        [--redis-url redis://127.0.0.1:6379]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from toolq import ToolClient
from toolq.cli.devredis import scratch_database
from toolq.config.loader import load_settings
from toolq.workers.process import WorkerProcess

PROJECT = Path(__file__).resolve().parent.parent / "cli" / "projects" / "bench"
CONFIG = PROJECT / "compozy.yaml"
TOOL = "echo_size"


def closed_loop(client: ToolClient, queue: str, calls: int, concurrency: int) -> float:
    def one(n: int) -> None:
        result = client.run(TOOL, {"data": f"call {n}"}, queue=queue, wait=60)
        if not result.ok:
            raise RuntimeError(f"call failed: {result.error}")

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency * 2)))  # warm-up
        start = time.perf_counter()
        list(pool.map(one, range(calls)))
        return calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    args = parser.parse_args()
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            del os.environ[name]
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with (
        tempfile.TemporaryDirectory() as tmp,
        scratch_database(args.redis_url, "bench") as url,
    ):
        settings = load_settings(CONFIG, environ={}, overrides={"redis_url": url})
        spans_file = str(Path(tmp) / "spans.jsonl")
        with ToolClient(settings) as client:
            for _ in range(args.rounds):
                for mode in ("off", "on"):
                    env = {"OTEL_TRACES_FILE": spans_file if mode == "on" else ""}
                    os.environ["OTEL_TRACES_FILE"] = env["OTEL_TRACES_FILE"]
                    queue = f"bench-trace-{uuid.uuid4().hex[:8]}"
                    with WorkerProcess(
                        config=CONFIG, redis_url=url, queues=[queue], env=env
                    ) as worker:
                        worker.start(client.app)
                        rate = closed_loop(client, queue, args.calls, args.concurrency)
                    rates[mode].append(rate)
                    print(f"{mode:>3}: {rate:7.1f} calls/s", flush=True)
        spans = Path(spans_file).read_text().count("\n") if os.path.exists(spans_file) else 0
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(
        f"median off {off:.1f} calls/s, on {on:.1f} calls/s: "
        f"tracing costs {100 * (1 - on / off):+.1f} % ({spans} spans written)"
    )


if __name__ == "__main__":
    main()
