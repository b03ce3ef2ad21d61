"""Issue 31's repro as a count: SIGKILL an idle worker, enqueue at once, restart it.

    .venv/bin/python bench/investigations/kill_idle.py [--trials 10] [--calls 40] [--parallel 5]

Each trial starts a worker on a queue of its own (the test tools' redelivery config:
visibility timeout 20 s), lets it sit idle, SIGKILLs it and, without waiting for it to
exit, enqueues ``--calls`` calls (one chunk; ``--calls 1``: a single call), starts a new
worker and waits up to 60 s for every result. Counts every call id: lost (no result),
runs (one log line per run, in either worker's log), ran twice. Before issue 31's fix
(kombu's BRPOP) the issue saw 4 of 5 single calls and 2 of 3 chunks of 40 lost.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from toolq import ResultTimeout, ToolClient  # noqa: E402
from toolq.cli.devredis import ensure_redis, scratch_database  # noqa: E402
from toolq.config.loader import load_settings  # noqa: E402
from toolq.workers.process import WorkerProcess  # noqa: E402

CONFIG = ROOT / "tests" / "tools" / "redelivery.yaml"


def trial(url: str, calls: int, rng: random.Random) -> dict[str, Any]:
    queue = f"killidle-{uuid.uuid4().hex[:8]}"
    settings = load_settings(CONFIG, environ={}, overrides={"redis_url": url, "queue": queue})
    with ToolClient(settings) as client:
        doomed = WorkerProcess(config=CONFIG, redis_url=url, queues=[queue], concurrency=1)
        survivor = WorkerProcess(config=CONFIG, redis_url=url, queues=[queue], concurrency=4)
        try:
            doomed.start(client.app)
            assert client.run("echo", {}, wait=30).ok  # connected, then idle
            time.sleep(rng.uniform(0.5, 1.5))
            assert doomed.proc is not None
            doomed.proc.kill()  # SIGKILL, and enqueue without waiting for it to exit
            sent = client.enqueue_many("echo", [{"n": n} for n in range(calls)], chunk_size=40)
            doomed.proc.wait()
            survivor.start(client.app)
            lost = 0
            try:
                results = client.gather(sent, wait=60)
            except ResultTimeout:
                results = []
                for call in sent:
                    try:
                        results.append(client.call(call.id).result(timeout=0.1))
                    except ResultTimeout:
                        lost += 1
            logs = doomed.output() + survivor.output()
            runs = [logs.count(f"call {call.id} echo:") for call in sent]
            return {
                "calls": calls,
                "lost": lost,
                "failed": sum(1 for r in results if not r.ok),
                "ran_twice": sum(1 for n in runs if n > 1),
                "redelivered": sum(1 for r in results if r.metadata.get("attempts", 1) > 1),
            }
        finally:
            doomed.close()
            survivor.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--calls", type=int, default=40, help="calls per send (40: one chunk)")
    parser.add_argument("--parallel", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    reports: list[dict[str, Any]] = []
    lock = threading.Lock()
    with ensure_redis(None) as base, scratch_database(base, "bench-kill-idle") as url:
        pending = list(range(args.trials))

        def runner() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    pending.pop()
                    seed = rng.random()
                report = trial(url, args.calls, random.Random(seed))
                with lock:
                    reports.append(report)
                    print(json.dumps(report), flush=True)

        threads = [threading.Thread(target=runner) for _ in range(args.parallel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    total = {
        key: sum(r[key] for r in reports)
        for key in ("calls", "lost", "failed", "ran_twice", "redelivered")
    }
    total["trials"] = len(reports)
    total["trials_losing_calls"] = sum(1 for r in reports if r["lost"])
    print(json.dumps(total))
    return 0 if total["lost"] == 0 and total["failed"] == 0 and total["ran_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
