"""A plain Celery app, as a user would write one without toolq: the benchmark's baseline.

``toolq bench`` compares toolq with what a user would pick instead, so this app has
none of toolq's settings — only what a user running slow tasks would set (late acks,
a prefetch of one) and one no-op task. The broker and result backend come from the
command line, so nothing is read at import time::

    python -m celery -A toolq.cli.bench_baseline -b REDIS_URL --result-backend REDIS_URL \\
        worker --pool threads --concurrency 10 --queues QUEUE

It ships in the package, so ``toolq bench`` works from an installed wheel too.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

NOOP = "baseline.noop"
SETTINGS: dict[str, Any] = {"task_acks_late": True, "worker_prefetch_multiplier": 1}
"""All a user would add to Celery's defaults for this workload."""

app = Celery("toolq_bench_baseline", set_as_current=False)
app.conf.update(SETTINGS)


@app.task(name=NOOP)  # type: ignore[untyped-decorator]
def noop(payload: Any = None) -> None:
    """Does nothing: the plain Celery floor a tool call is measured against."""


def producer(redis_url: str) -> Celery:
    """The same app on the producing side, connected to ``redis_url``."""
    client = Celery("toolq_bench_baseline", broker=redis_url, backend=redis_url)
    client.conf.update(SETTINGS)
    return client
