"""What each of toolq's Celery settings costs a call (issue 15: "measure each setting").

A no-op task on a bare Celery worker (no Bun, no toolq handler), closed loop (enqueue N,
then collect every result), once per variant, in interleaved rounds:

- ``plain``: Celery's defaults plus late acks and a prefetch of one (``bench_baseline``);
- ``toolq``: ``celery_config(settings, worker=True)``, the settings every toolq worker
  and producer uses; then toolq's settings with one thing taken out or added at a time.

Producer and worker use the same variant. Needs a Redis (TOOLQ_REDIS_URL, else a
private one).

    .venv/bin/python bench/investigations/celery_settings_cost.py [--calls 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from toolq.cli.bench_baseline import SETTINGS as PLAIN
from toolq.cli.bench_loops import rotated
from toolq.config.celery_app import celery_config
from toolq.config.loader import load_settings

HERE = Path(__file__).resolve().parent
VARIANT_ENV = "TOOLQ_BENCH_CELERY_VARIANT"
VARIANTS = {
    "plain": "Celery defaults + late acks, prefetch 1 (the baseline)",
    "toolq": "toolq's Celery settings (task events on demand: none asked for)",
    "toolq + task events": "worker_send_task_events on (performance.task_events: always)",
    "toolq - priority lists": "no priority_steps (one Redis list per queue)",
    "toolq - socket timeouts": "no socket/connect timeouts, no health checks",
    "toolq - backend retries": "result_backend_always_retry off",
    "toolq + poison guard": "toolq's consumer that checks every message (workers/poison.py)",
}


def variant_config(variant: str, redis_url: str, *, worker: bool) -> dict[str, Any]:
    if variant == "plain":
        return {"broker_url": redis_url, "result_backend": redis_url, **PLAIN}
    settings = load_settings(None, environ={}, overrides={"redis_url": redis_url})
    config = celery_config(settings, worker=worker)
    transport = dict(config["broker_transport_options"])
    if variant == "toolq + task events":
        config["worker_send_task_events"] = True
    elif variant == "toolq - priority lists":
        transport.pop("priority_steps")
        transport.pop("sep")
    elif variant == "toolq - socket timeouts":
        for key in ("socket_timeout", "socket_connect_timeout", "health_check_interval"):
            transport.pop(key)
        for key in ("redis_socket_timeout", "redis_socket_connect_timeout"):
            config.pop(key)
    elif variant == "toolq - backend retries":
        config["result_backend_always_retry"] = False
    config["broker_transport_options"] = transport
    return config


def make_app(variant: str, redis_url: str, *, worker: bool) -> Celery:
    app = Celery("toolq_celery_settings_cost", set_as_current=False)
    app.conf.update(variant_config(variant, redis_url, worker=worker))

    @app.task(name="cost.noop", acks_late=True)  # type: ignore[untyped-decorator]
    def noop() -> None:
        """Does nothing."""

    return app


# -- the worker side: ``celery -A celery_settings_cost worker`` ------------------------------

if VARIANT_ENV in os.environ:
    _variant, _url = json.loads(os.environ[VARIANT_ENV])
    app = make_app(_variant, _url, worker=True)
    if _variant == "toolq + poison guard":
        from toolq.workers import poison

        poison.install(app, load_settings(None, environ={}, overrides={"redis_url": _url}))


def start_worker(variant: str, redis_url: str, queue: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, VARIANT_ENV: json.dumps([variant, redis_url])}
    argv = [sys.executable, "-m", "celery", "-A", "celery_settings_cost", "worker"]
    argv += ["--pool=threads", "--concurrency=10", f"--queues={queue}", "--loglevel=WARNING"]
    argv += ["--without-mingle", "--without-gossip", f"--hostname={queue}@bench"]
    return subprocess.Popen(argv, cwd=HERE, env=env, stdout=subprocess.DEVNULL)


def closed_loop(app: Celery, queue: str, calls: int) -> float:
    started = time.perf_counter()
    sent = [app.send_task("cost.noop", queue=queue) for _ in range(calls)]
    for result in sent:
        result.get(timeout=120)
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from toolq.cli.devredis import ensure_redis, scratch_database

    with (
        ensure_redis(quiet=True) as base_url,
        scratch_database(base_url, "bench") as redis_url,
    ):
        producers, workers, queues = {}, [], {}
        try:
            for variant in VARIANTS:
                queues[variant] = f"cost-{uuid.uuid4().hex[:8]}"
                workers.append(start_worker(variant, redis_url, queues[variant]))
                producers[variant] = make_app(variant, redis_url, worker=False)
            for variant, app in producers.items():  # every worker answers
                deadline = time.monotonic() + 60
                while not app.control.ping([f"{queues[variant]}@bench"], timeout=0.5):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the {variant} worker did not start")
                closed_loop(app, queues[variant], 100)  # warm up
            rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
            for round_no in range(1, args.rounds + 1):
                for variant in rotated(tuple(VARIANTS), round_no):
                    rates[variant].append(
                        closed_loop(producers[variant], queues[variant], args.calls)
                    )
        finally:
            for process in workers:
                process.terminate()
            for process in workers:
                process.wait(30)
    plain = statistics.median(rates["plain"])
    toolq = statistics.median(rates["toolq"])
    print(f"closed loop of {args.calls} no-op calls, median of {args.rounds} rounds\n")
    print("| variant | what | calls/s | vs plain | vs toolq |")
    print("|---|---|---|---|---|")
    for variant, what in VARIANTS.items():
        rate = statistics.median(rates[variant])
        print(f"| {variant} | {what} | {rate:.0f} | {rate / plain:.2f}x | {rate / toolq:.2f}x |")


if __name__ == "__main__":
    main()
