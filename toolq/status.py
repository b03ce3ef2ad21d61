"""`toolq status`: one look at the cluster, gathered from Redis and the workers."""

from __future__ import annotations

from typing import Any

from toolq.config.celery_app import make_celery
from toolq.config.connections import redis_client
from toolq.config.settings import Settings
from toolq.workers.breaker import Breakers
from toolq.workers.deadletter import DeadLetters

INSPECT_TIMEOUT_S = 1.0


def cluster_status(settings: Settings) -> dict[str, Any]:
    """The project (None: un-namespaced), queues (configured and consumed) with lengths,
    workers, and the project's breakers and dead letters."""
    app = make_celery(settings, name="toolq-status")
    client = redis_client(settings)
    try:
        inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
        active = inspect.active() or {}
        reserved = inspect.reserved() or {}
        consumed = inspect.active_queues() or {}
        workers = [
            {
                "name": name,
                "queues": sorted(q["name"] for q in consumed.get(name, [])),
                "running": len(active.get(name, [])),
                "reserved": len(reserved.get(name, [])),
            }
            for name in sorted(set(active) | set(reserved) | set(consumed))
        ]
        names = list(settings.all_queues)
        for worker in workers:
            names += [q for q in worker["queues"] if q not in names]
        queues = [{"name": name, "length": int(client.llen(name))} for name in names]
        breakers = [
            vars(status)
            for status in Breakers(client, settings.breaker_settings, settings.keys).statuses()
        ]
        dead = DeadLetters(client, settings.dead_letter_max, settings.keys).count()
    finally:
        client.close()
        app.close()
    return {
        "project": settings.project,
        "queues": queues,
        "workers": workers,
        "breakers": breakers,
        "dead_letters": dead,
    }
