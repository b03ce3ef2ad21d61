"""The Celery app, configured from :class:`Settings` — the same for producers and workers.

Limits nest, so a call is never run twice by accident:
Bun's soft limit < hard limit < Celery's backstop limit < Redis' visibility timeout.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
import weakref
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from toolq import tracing
from toolq.config.connections import close_redis
from toolq.config.settings import Settings
from toolq.protocol import CallRequest, ChunkEntry, chunk_to_message
from toolq.sealing import Sealer
from toolq.signing import Signer

RUN_TOOL_TASK = "toolq.run_tool"
"""The one task: run a tool invocation with Bun and return its envelope."""
RUN_BATCH_TASK = "toolq.run_batch"
"""A chunk of calls in one message (``ToolClient.map``): each keeps its own id and result."""
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


BRPOP_READ_MARGIN_S = 10.0
"""A worker's broker sockets wait this much longer than kombu's 1 s BRPOP poll."""


def celery_config(settings: Settings, *, worker: bool = False) -> dict[str, Any]:
    """Celery settings derived from toolq's; Celery's own names are kept.

    Every socket has a connect and read timeout (``redis_socket_timeout``), so a hung
    Redis fails a producer fast instead of blocking it. A worker's broker reads are
    given more (its BRPOP waits up to a second for a call), and its result writes retry
    for as long as Redis is away: a call finished during an outage is stored once Redis
    is back, never run again. Producers give up on the backend after a few tries.
    """
    timeout = settings.redis_socket_timeout_s
    read_timeout = timeout + BRPOP_READ_MARGIN_S if worker else timeout
    transport: dict[str, Any] = {
        # Redelivery of an unacknowledged call (worker killed mid-call) happens
        # this long after delivery: above every limit, far below Celery's 1 h default.
        "visibility_timeout": settings.redelivery_s,
        # Sweep for abandoned calls every 5 s (kombu's default is ~100 s).
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
        "health_check_interval": 25,
        "socket_timeout": read_timeout,
        "socket_connect_timeout": timeout,
        # Priorities (docs/flow-control.md, "Priorities"): one list per step. queue_order_strategy
        # stays round_robin: it orders a worker's *queues*, not priorities.
        "priority_steps": PRIORITY_STEPS,
        "sep": PRIORITY_SEP,
    }
    if settings.project:
        # kombu keeps unacknowledged deliveries in one hash per Redis database and restores
        # those older than *its* visibility timeout: per project, so a project with short
        # limits never redelivers another project's running calls.
        for key in ("unacked", "unacked_index", "unacked_mutex"):
            transport[f"{key}_key"] = settings.keys.prefix + key
    backend_transport: dict[str, Any] = {"retry_policy": {"timeout": timeout}}
    if settings.redis_sentinel_master:
        transport["master_name"] = settings.redis_sentinel_master
        backend_transport["master_name"] = settings.redis_sentinel_master
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": backend_transport,
        "redis_socket_timeout": timeout,
        "redis_socket_connect_timeout": timeout,
        "broker_connection_timeout": timeout,
        # A result finished while Redis restarts is stored once Redis is back, not lost:
        # workers retry without limit (every 2 s at most); producers a few times.
        "result_backend_always_retry": True,
        "result_backend_max_retries": float("inf") if worker else 3,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # No STARTED state: it costs a read and a write per call (Flower still shows
        # running calls, from task events).
        "task_track_started": False,
        # With late acks a running call stays unacknowledged, so a prefetch of one per
        # slot means a busy worker holds no call it is not running: it hoards nothing.
        "worker_prefetch_multiplier": 1,
        # Task events cost about a fifth of a trivial call's throughput (bench/investigations/
        # celery_settings_cost.py), so by default a worker sends them only once a monitor
        # asks: Flower broadcasts enable_events every 5 s (workers started later too),
        # `toolq flower` once more at start. Worker events (heartbeats) always flow.
        "worker_send_task_events": settings.performance.task_events == "always",
        # No task-sent event: it costs the producer a PUBLISH per call, and Flower would
        # rename a call it already knows as toolq:<tool> back to toolq.run_tool whenever
        # that event arrives after the worker's (events travel on different connections).
        # Flower shows a call from the moment a worker receives it; queued calls are
        # counted on its broker page and by `toolq status`.
        "task_send_sent_event": False,
        "result_expires": 24 * 3600,
        "result_extended": False,  # args would carry the call's env into Redis twice
        "enable_utc": True,
    }


def send_call(
    app: Celery,
    request: CallRequest,
    call_id: str,
    queue: str | None,
    sealer: Sealer | None,
    *,
    signer: Signer | None = None,
    countdown: float | None = None,
    retry: bool = True,
) -> AsyncResult:
    """Send one call as a single message (``toolq.run_tool``) under its own id: how a
    producer enqueues it, and how a worker tries a chunk's call again. Flower shows it as
    ``toolq:<tool id>``, its arguments the tool id and a short input, env values never.
    With a ``signer`` (a secret key) the message carries its signature."""
    message = request.to_message(sealer)
    queue = queue or app.conf.task_default_queue
    headers = call_headers(request, message, call_id, queue, signer)

    def send() -> AsyncResult:
        return app.send_task(
            RUN_TOOL_TASK,
            args=[message],
            task_id=call_id,
            queue=queue,
            countdown=countdown,
            priority=broker_priority(request.priority),
            argsrepr=request.describe(),
            kwargsrepr="{}",
            shadow=f"toolq:{request.tool_id}",
            headers=headers,
            retry=retry,
        )

    if not tracing.enabled():
        return send()
    with tracing.producer_span(
        "toolq.enqueue", headers, queue=queue, message_id=call_id, tool_id=request.tool_id
    ):
        return send()


def call_headers(
    request: CallRequest, message: Any, call_id: str, queue: str, signer: Signer | None
) -> dict[str, Any]:
    """A single call's own message headers: its tool id (Flower, logs) and, with a
    signer, its signature over ``message`` as sent to ``queue``."""
    headers: dict[str, Any] = {"toolq_tool_id": request.tool_id}
    if signer is not None:
        headers.update(signer.headers(RUN_TOOL_TASK, call_id, queue, message))
    return headers


def send_chunk(
    app: Celery, entries: list[ChunkEntry], queue: str | None, signer: Signer | None = None
) -> str:
    """Send calls as one chunk message (``toolq.run_batch``); return the chunk's own id.

    Flower shows it as ``toolq:<tool id>`` (its first call's), its arguments as the
    number of calls and the first and last ids; the calls' inputs stay out of events.
    With a ``signer`` the chunk is signed as one message."""
    first = entries[0].message if isinstance(entries[0].message, dict) else {}
    tool_id, priority = first.get("tool_id"), first.get("priority")
    calls = chunk_to_message(entries)
    chunk_id = str(uuid.uuid4())
    queue = queue or app.conf.task_default_queue
    headers = {} if signer is None else signer.headers(RUN_BATCH_TASK, chunk_id, queue, calls)

    def send() -> AsyncResult:
        return app.send_task(
            RUN_BATCH_TASK,
            args=[calls],
            task_id=chunk_id,
            headers=headers,
            queue=queue,
            priority=broker_priority(priority if isinstance(priority, int) else None),
            argsrepr=f"({len(entries)} calls: {entries[0].call_id} … {entries[-1].call_id})",
            kwargsrepr="{}",
            shadow=f"toolq:{tool_id}" if isinstance(tool_id, str) else None,
            retry=False,
        )

    if not tracing.enabled():
        return str(send().id)
    with tracing.producer_span(
        "toolq.enqueue_chunk",
        headers,
        queue=queue,
        message_id=chunk_id,
        tool_id=tool_id if isinstance(tool_id, str) else None,
        attributes={"messaging.batch.message_count": len(entries)},
    ):
        return str(send().id)


class ClosingCelery(Celery):  # type: ignore[misc]
    """A Celery app whose ``close()`` closes the result backends' connections too.

    Celery's own ``close()`` only drops the broker pool (kombu keeps one per URL for the
    whole process): each thread's result backend keeps its connection, and a pub/sub one
    once a result was waited for, open until the garbage collector finds the app — two
    sockets per closed client, per thread that used it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._backends_made: weakref.WeakSet[Any] = weakref.WeakSet()
        self._backends_lock = threading.Lock()

    def _get_backend(self) -> Any:
        backend = super()._get_backend()  # once per thread: Celery's backends are per thread
        with self._backends_lock:
            self._backends_made.add(backend)
        return backend

    def close(self) -> None:
        super().close()
        with self._backends_lock:
            backends = list(self._backends_made)
        for backend in backends:
            _close_backend(backend)


def _close_backend(backend: Any) -> None:
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        with contextlib.suppress(Exception):  # its connection may be broken already
            consumer.stop()
    client = backend.__dict__.get("client")  # made on first use (a cached property)
    if client is not None:
        close_redis(client)


def make_celery(settings: Settings, name: str = "toolq", *, worker: bool = False) -> Celery:
    app = ClosingCelery(name, set_as_current=False)
    app.conf.update(celery_config(settings, worker=worker))
    return app
