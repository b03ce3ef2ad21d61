"""Celery remote control, restricted: nothing on Redis can stop a worker or move its queues.

Celery's remote-control commands travel over the broker, unauthenticated: anyone who can
write to Redis (a tool granted network access, another project's producer) can broadcast
``shutdown``, ``pool_restart``, ``add_consumer`` (make a worker take another project's
queue) or ``cancel_consumer``. By default (``remote_control: inspect``) a worker obeys only
the read-only commands that ``toolq status``, Flower and the test suite use, and Flower's
switch for task events; any other command is answered with an error and does nothing.
``remote_control: all`` restores Celery's full set (``toolq bench`` uses it to hand a
filled queue to a worker).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.control import Panel

log = logging.getLogger("toolq.worker")

ALLOWED = frozenset(
    {
        # read-only: toolq status (active, reserved, active_queues), Flower, WorkerProcess
        "ping",
        "stats",
        "active",
        "reserved",
        "scheduled",
        "revoked",
        "registered",
        "active_queues",
        "query_task",
        "clock",
        "hello",
        # Flower turns task events on every 5 s (config/celery_app.py, task_events)
        "enable_events",
        "disable_events",
        "heartbeat",
    }
)
"""Commands a worker obeys by default (their aliases, such as dump_active, too)."""


def allowed_handlers(handlers: dict[str, Any], mode: str) -> dict[str, Any]:
    """The remote-control handlers a worker keeps: all of them in mode ``all``."""
    if mode == "all":
        return handlers
    kept = {handlers[name] for name in ALLOWED if name in handlers}
    return {name: handler for name, handler in handlers.items() if handler in kept}


def restrict(consumer: Any, mode: str) -> None:
    """Limit the consumer's remote-control mailbox (if it has one) to ``mode``'s commands."""
    for step in getattr(consumer.blueprint, "steps", {}).values():
        node = getattr(getattr(step, "box", None), "node", None)
        if node is not None and getattr(node, "handlers", None) is not None:
            node.handlers = allowed_handlers(dict(Panel.data), mode)
            if mode != "all":
                log.debug("remote control limited to %s", ", ".join(sorted(ALLOWED)))
