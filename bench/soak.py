"""`make soak`: a chaos soak — calls keep flowing while workers are SIGKILLed and Redis is
killed (-9) and restarted under them. Not part of `make test`.

    .venv/bin/python bench/soak.py [--calls 600] [--duration 90] [--long-outage] [--seed 1]

Starts its own Redis (AOF on, fsync always, on a free port), three workers on the test
tool project's short redelivery config (two ``threads`` workers, one ``prefork``), and a
producer pacing ``--calls`` calls of a tool that records every run to a file of its own
and sleeps 50-500 ms — every ``--chunk-every``-th send a chunk of ``--chunk-size`` calls
(``enqueue_many``: the bulk path). During ``--duration`` seconds a chaos loop picks at
random: SIGKILL a worker (a new one replaces it), or kill Redis and start it again after
a 1-8 s outage (one outage of 35 s, past Celery's old result-retry budget, when
``--long-outage``). A worker that exits on its own is counted (it should never happen)
and replaced.

Reports, bounded in count and time: calls lost (no result by the end; goal 0), calls
run more than once (their worker was killed mid-run, or an outage hid a result; each
still has one result), failed results, enqueue retries during outages, worker exits we
did not cause, and the latency tail: from enqueue to the worker finishing the call (so a
redelivery after a kill counts; the wait for Redis to come back before a result is
readable does not).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolq import BrokerUnavailable, ResultTimeout, ToolClient  # noqa: E402
from toolq.cli.devredis import RedisServer  # noqa: E402
from toolq.config.loader import load_settings  # noqa: E402
from toolq.workers.process import WorkerProcess  # noqa: E402

PROJECT = ROOT / "tests" / "tools"
CONFIG = PROJECT / "redelivery.yaml"  # visibility timeout 20 s: killed calls come back soon


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.server = RedisServer(persistent=True)
        # not under .tmp: pytest empties its basetemp there at every run
        self.counters = PROJECT / ".soak" / f"soak-{uuid.uuid4().hex[:8]}"
        self.workers: list[WorkerProcess] = []
        self.calls: list[tuple[str, float, Path]] = []  # id, enqueued at, counter
        self.enqueue_retries = 0
        self.events: list[str] = []
        self.own_exits: list[int | None] = []
        self.kills: list[float] = []  # wall-clock times of our SIGKILLs
        self.started = time.monotonic()

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        self.events.append(line)
        if not self.args.json:
            print(line, flush=True)

    # -- parts -------------------------------------------------------------------------

    def start_worker(self, client: ToolClient, pool: str) -> None:
        worker = WorkerProcess(
            config=CONFIG,
            redis_url=self.server.url,
            pool=pool,
            concurrency=4 if pool == "threads" else 2,
            loglevel="WARNING",
        )
        self.workers.append(worker.start(client.app, timeout_s=60))

    def kill_worker(self, client: ToolClient) -> None:
        worker = self.rng.choice(self.workers)
        pool = next(a.split("=", 1)[1] for a in worker.argv if a.startswith("--pool="))
        self.kills.append(time.time())
        worker.kill()
        self.workers.remove(worker)
        worker.close()
        self.log(f"SIGKILL worker ({pool})")
        self.start_worker(client, pool)

    def restart_redis(self, outage_s: float) -> None:
        assert self.server.proc is not None
        self.server.proc.kill()
        self.server.proc.wait()
        self.log(f"Redis killed (-9), back in {outage_s:.1f}s")
        time.sleep(outage_s)
        self.server.start()

    def replace_exited(self, client: ToolClient) -> None:
        for worker in list(self.workers):
            if worker.proc is not None and worker.proc.poll() is not None:
                code = worker.proc.returncode
                self.own_exits.append(code)
                self.log(f"worker exited by itself, code {code}: replaced")
                pool = next(a.split("=", 1)[1] for a in worker.argv if a.startswith("--pool="))
                self.workers.remove(worker)
                worker.close()
                self.start_worker(client, pool)

    # -- load ----------------------------------------------------------------------------

    def produce(self, client: ToolClient) -> None:
        """Paced single calls; every ``--chunk-every``-th step a chunk of calls
        (``enqueue_many``) instead, so the bulk path goes through the same chaos."""
        interval = self.args.duration / self.args.calls
        n = 0
        step = 0
        while n < self.args.calls:
            step += 1
            size = (
                self.args.chunk_size
                if self.args.chunk_every and step % self.args.chunk_every == 0
                else 1
            )
            size = min(size, self.args.calls - n)
            counters = [self.counters / f"{n + i}" for i in range(size)]
            payloads = [{"counter": str(c), "ms": self.rng.randint(50, 500)} for c in counters]
            while True:
                try:
                    if size == 1:
                        calls = [client.enqueue("breaker_target", payloads[0])]
                    else:
                        calls = client.enqueue_many("breaker_target", payloads, chunk_size=size)
                    break
                except BrokerUnavailable:  # Redis is away: the caller sees it, tries again
                    self.enqueue_retries += 1
                    time.sleep(0.5)
            now = time.time()
            self.calls += [(call.id, now, c) for call, c in zip(calls, counters, strict=True)]
            n += size
            time.sleep(interval * size)

    def chaos(self, client: ToolClient, until: float) -> None:
        long_outage_done = not self.args.long_outage
        while time.monotonic() < until:
            time.sleep(self.rng.uniform(4, 9))
            self.replace_exited(client)
            if time.monotonic() >= until:
                break
            if not long_outage_done and time.monotonic() > self.started + self.args.duration / 2:
                self.restart_redis(35.0)
                long_outage_done = True
            elif self.rng.random() < 0.7:
                self.kill_worker(client)
            else:
                self.restart_redis(self.rng.uniform(1, 8))
            time.sleep(1)
            self.replace_exited(client)

    # -- run -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.counters.mkdir(parents=True)  # the sandbox lets tools write in the project
        if os.geteuid() == 0:  # a root worker runs tools as uid 65534 (docs/security/sandbox.md)
            for path in (self.counters.parent, self.counters):
                path.chmod(0o1777)
        self.server.start()
        settings = load_settings(CONFIG, environ={}, overrides={"redis_url": self.server.url})
        client = ToolClient(settings)
        try:
            for pool in ("threads", "threads", "prefork"):
                self.start_worker(client, pool)
            self.log(f"{len(self.workers)} workers up; {self.args.calls} calls")
            producer = threading.Thread(target=self.produce, args=(client,), daemon=True)
            producer.start()
            self.chaos(client, time.monotonic() + self.args.duration)
            producer.join()
            self.replace_exited(client)
            self.log("chaos over; collecting results")
            return self.collect(client)
        finally:
            for worker in self.workers:
                worker.close()
            client.close()
            self.server.close()
            shutil.rmtree(self.counters, ignore_errors=True)

    def collect(self, client: ToolClient) -> dict[str, Any]:
        deadline = time.monotonic() + self.args.collect_timeout
        results: dict[str, Any] = {}
        lost: list[str] = []
        latencies: list[float] = []
        for call_id, enqueued_at, _counter in self.calls:
            remaining = max(deadline - time.monotonic(), 1.0)
            try:
                result = client.call(call_id).result(timeout=remaining)
            except (ResultTimeout, BrokerUnavailable):
                lost.append(call_id)
                continue
            results[call_id] = result
            finished = result.metadata.get("finished_at")
            if isinstance(finished, int | float):
                latencies.append(max(0.0, finished - enqueued_at))
        starts = {
            call_id: [int(ms) / 1000 for ms in counter.read_text().split()]
            if counter.exists()
            else []
            for call_id, _, counter in self.calls
        }
        runs = {call_id: len(times) for call_id, times in starts.items()}
        # A run cut short by our SIGKILL (started < 0.6 s before it: the tool sleeps
        # at most 0.5 s) is redelivered by design; any other second run is a finding.
        cut = {
            call_id
            for call_id, times in starts.items()
            if len(times) > 1 and any(0 <= kill - times[0] < 0.6 for kill in self.kills)
        }
        failed = [r for r in results.values() if not r.ok]
        latencies.sort()

        def pct(q: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)

        return {
            "calls": len(self.calls),
            "lost": len(lost),
            "lost_ids": lost[:20],
            "results": len(results),
            "failed": len(failed),
            "failed_kinds": sorted({r.error.kind for r in failed if r.error}),
            "ran_more_than_once": sum(1 for n in runs.values() if n > 1),
            "ran_again_after_a_kill": len(cut),
            "ran_again_otherwise": sum(1 for c, n in runs.items() if n > 1 and c not in cut),
            "never_ran_but_answered": sum(
                1 for cid, n in runs.items() if n == 0 and cid in results and results[cid].ok
            ),
            "worker_kills": sum("SIGKILL" in e for e in self.events),
            "redis_restarts": sum("Redis killed" in e for e in self.events),
            "worker_exits_not_ours": self.own_exits,
            "enqueue_retries": self.enqueue_retries,
            "latency_s": {
                "p50": pct(0.50),
                "p95": pct(0.95),
                "p99": pct(0.99),
                "max": round(latencies[-1], 3) if latencies else None,
                "mean": round(statistics.fmean(latencies), 3) if latencies else None,
            },
            "seed": self.args.seed,
            "duration_s": self.args.duration,
            "wall_s": round(time.monotonic() - self.started, 1),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--duration", type=float, default=90.0, help="chaos window, seconds")
    parser.add_argument("--collect-timeout", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--long-outage", action="store_true", help="one 35 s Redis outage")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--chunk-every", type=int, default=4, help="every N-th send is a chunk (0: none)"
    )
    parser.add_argument("--chunk-size", type=int, default=5, help="calls per chunk")
    args = parser.parse_args()
    report = Soak(args).run()
    print(json.dumps(report, indent=2))
    # Every call of this tool succeeds when nothing breaks: a failure is a finding too.
    ok = report["lost"] == 0 and report["failed"] == 0 and not report["worker_exits_not_ours"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
