"""The Celery app, configured from :class:`Settings` — the same for producers and workers.

Limits nest, so a call is never run twice by accident:
Bun's soft limit < hard limit < Celery's backstop limit < Redis' visibility timeout.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from toolq.config.settings import Settings

RUN_TOOL_TASK = "toolq.run_tool"
"""The one task: run a tool invocation with Bun and return its envelope."""
NOOP_TASK = "toolq.noop"
"""A task that does nothing, on every worker: the baseline for benchmarks."""
PRIORITY_STEPS = list(range(10))
"""kombu's Redis transport keeps one list per priority step (``<queue>`` for 0, else
``<queue>\x06\x16<step>``) and a worker's BRPOP names them in step order, so it takes
from step 0 first. Ten steps: each of toolq's priorities has a list of its own."""
PRIORITY_SEP = "\x06\x16"


def broker_priority(priority: int | None) -> int:
    """toolq's priority (0 default .. 9 most urgent) as kombu's Redis one (0 first)."""
    return 9 - (priority or 0)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting calls, one per priority step."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from toolq's; Celery's own names are kept."""
    transport: dict[str, Any] = {
        # Redelivery of an unacknowledged call (worker killed mid-call) happens
        # this long after delivery: above every limit, far below Celery's 1 h default.
        "visibility_timeout": settings.redelivery_s,
        # Sweep for abandoned calls every 5 s (kombu's default is ~100 s).
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
        "health_check_interval": 25,
        # Priorities (README, "Flow control"): one list per step. queue_order_strategy
        # stays round_robin: it orders a worker's *queues*, not priorities.
        "priority_steps": PRIORITY_STEPS,
        "sep": PRIORITY_SEP,
    }
    backend_transport: dict[str, Any] = {"retry_policy": {"timeout": 5.0}}
    if settings.redis_sentinel_master:
        transport["master_name"] = settings.redis_sentinel_master
        backend_transport["master_name"] = settings.redis_sentinel_master
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": backend_transport,
        # A result finished while Redis restarts is stored once Redis is back, not lost.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # No STARTED state: it costs a read and a write per call (Flower still shows
        # running calls from task events).
        "task_track_started": False,
        # With late acks a running call stays unacknowledged, so a prefetch of one per
        # slot means a busy worker holds no call it is not running: it hoards nothing.
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "result_expires": 24 * 3600,
        "result_extended": False,  # args would carry the call's env into Redis twice
        "enable_utc": True,
    }


def make_celery(settings: Settings, name: str = "toolq") -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
