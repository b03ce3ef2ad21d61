"""`toolq status`: one look at the cluster, gathered from Redis and the workers."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import redis

from toolq.config.celery_app import make_celery, queue_lists
from toolq.config.connections import close_redis, redis_client
from toolq.config.settings import Settings
from toolq.workers import info
from toolq.workers.breaker import Breakers
from toolq.workers.deadletter import DeadLetters

INSPECT_TIMEOUT_S = 1.0


def cluster_status(settings: Settings) -> dict[str, Any]:
    """The project (None: un-namespaced), queues (configured and consumed) with lengths
    and caps, workers, the project's breakers and dead letters, and flow control."""
    client = redis_client(settings, ride_out_restarts=False)
    try:
        client.ping()  # Redis away: one error now (RedisError), before Celery's retries
    except BaseException:
        close_redis(client)
        raise
    app = make_celery(settings, name="toolq-status")
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
        described = info.read(client, settings.keys, [worker["name"] for worker in workers])
        for worker in workers:
            # None: a worker that does not say (one of an older toolq)
            told = described.get(worker["name"], {})
            worker["sandboxed"] = told.get("sandboxed")
            worker["sandbox_mode"] = told.get("sandbox_mode")
        names = list(settings.all_queues)
        names += [q for q in settings.max_queue_lengths if q not in names]
        for worker in workers:
            names += [q for q in worker["queues"] if q not in names]
        queues = [
            {
                "name": name,
                "length": _length(client, name),
                "calls": queued_calls(client, name),
                "cap": settings.queue_cap(name),
            }
            for name in names
        ]
        flow = flow_status(client, settings)
        breakers = [
            vars(status)
            for status in Breakers(client, settings.breaker_settings, settings.keys).statuses()
        ]
        dead = DeadLetters.from_settings(client, settings).count()
    finally:
        close_redis(client)
        app.close()
    return {
        "project": settings.project,
        "queues": queues,
        "workers": workers,
        "breakers": breakers,
        "dead_letters": dead,
        "flow": flow,
    }


def queued_calls(client: redis.Redis, queue: str) -> int:
    """Calls waiting in a queue (a chunk of N calls is one message and N calls): the
    count the exporter serves too (:func:`toolq.cli.backlog.count_list`, in Redis, a page
    of 1,000 messages at a time; none leaves Redis)."""
    from toolq.cli.backlog import count_list  # it imports flow_status from here

    return sum(count_list(client, name)[1] for name in queue_lists(queue))


def _length(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a queue, over its priority lists (a chunk is one)."""
    with client.pipeline(transaction=False) as pipe:
        for name in queue_lists(queue):
            pipe.llen(name)
        return sum(int(n) for n in pipe.execute())


def flow_status(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Slots in use and calls waiting per capped tool (and per key in use), and calls
    holding a future rate token per rate-limited tool; read on Redis' clock."""
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    keys = settings.keys
    slots: list[dict[str, Any]] = []
    rates: list[dict[str, Any]] = []
    for tool_id, tool in sorted(settings.tools.items()):
        if tool.max_concurrency is not None:
            found: list[str | None] = [None]
            if tool.concurrency_key is not None:  # keys with a slot held or a waiter
                seen: set[str] = set()
                for prefix in (keys.slots(tool_id, ""), keys.slot_waiting_seen(tool_id, "")):
                    seen.update(
                        unquote(raw.decode()[len(prefix) :])
                        for raw in client.scan_iter(match=prefix + "*", count=500)
                    )
                found = [key for key in sorted(seen)]
            for key in found:
                in_use = client.zcount(keys.slots(tool_id, key), f"({now}", "+inf")
                waiting = client.zcount(keys.slot_waiting_seen(tool_id, key), f"({now}", "+inf")
                if key is None or in_use or waiting:
                    slots.append(
                        {
                            "tool_id": tool_id,
                            "key": key,
                            "in_use": int(in_use),
                            "limit": tool.max_concurrency,
                            "waiting": int(waiting),
                        }
                    )
        if tool.rate_limit is not None:
            waiting = client.zcount(keys.rate_waiting(tool_id), f"({now}", "+inf")
            rates.append(
                {
                    "tool_id": tool_id,
                    "rate_limit": tool.rate_limit,
                    "mode": tool.rate_limit_mode,
                    "waiting": int(waiting),
                }
            )
    return {"slots": slots, "rate": rates}
