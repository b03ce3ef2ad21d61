"""The Celery task: a thin shell that hands each message to the call handler.

A call that ends in failure raises :class:`~toolq.errors.ToolCallFailed` carrying its
whole envelope, so Celery and Flower record it as FAILURE (declared in ``throws``: an
expected outcome, logged without a traceback); the caller still gets the envelope.
Flower shows each call under ``toolq:<tool id>`` (Celery's shadow name).

A retry is a new message for the same call id, published with a countdown
(Celery's ``Task.retry``): the slot is free while the call waits, any worker may
take the next attempt, and the caller's ``result()`` simply keeps waiting. A call
waiting for a cluster slot or a rate token is re-published the same way, so Flower
shows it as RETRY (with its countdown), never as running.

A chunk of calls (``toolq.run_batch``, from ``ToolClient.map``) is one message whose
calls :class:`~toolq.workers.batch.ChunkRunner` runs over the worker's free slots, each
with its own result; Flower shows the chunk as one task (``toolq:<tool id>``, its
arguments naming the number of calls, its result the tally of how they ended); the
chunk itself stores no result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, states
from celery.exceptions import Retry as Retry_
from celery.exceptions import SoftTimeLimitExceeded

from toolq import tracing
from toolq.config.celery_app import (
    NOOP_TASK,
    RUN_BATCH_TASK,
    RUN_TOOL_TASK,
    broker_priority,
    call_headers,
    send_call,
    send_chunk,
)
from toolq.config.settings import BACKSTOP_MARGIN_S, CELERY_HARD_MARGIN_S
from toolq.errors import InvalidInput, ToolCallFailed
from toolq.protocol import chunk_from_message
from toolq.workers.batch import Chunk, ChunkRunner
from toolq.workers.call.attempt import Delivery, Final, Retry
from toolq.workers.call.handler import CallHandler

log = logging.getLogger("toolq.worker")


def register_tasks(app: Celery, handler: CallHandler, chunks: ChunkRunner | None = None) -> Task:
    """Register ``toolq.run_tool`` (and, with a chunk runner, ``toolq.run_batch``) on
    ``app``, bound to this worker's handler."""
    backstop = handler.settings.max_hard_timeout_s + BACKSTOP_MARGIN_S

    @app.task(  # type: ignore[untyped-decorator]
        name=RUN_TOOL_TASK,
        bind=True,
        throws=(ToolCallFailed,),
        shadow_name=lambda task, args, kwargs, options: shadow_name(args),
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,  # the handler's policy decides, not Celery's counter
        # Celery's own limits only back up the runtime's, on pools that support them.
        soft_time_limit=backstop,
        time_limit=backstop + CELERY_HARD_MARGIN_S,
    )
    def run_tool(self: Task, message: Any) -> dict[str, Any]:
        if not tracing.enabled():
            return attempt(self, message)
        info = self.request.delivery_info or {}
        fields = message if isinstance(message, dict) else {}
        tool_id = fields.get("tool_id")
        carrier = tracing.headers_of(self.request)
        with tracing.consumer_span(
            "toolq.attempt",
            carrier,
            queue=info.get("routing_key"),
            message_id=str(self.request.id),
            tool_id=tool_id if isinstance(tool_id, str) else None,
            attributes={"toolq.attempt": int(fields.get("attempt", 1) or 1)},
            expected=(ToolCallFailed, Retry_),
        ) as span:
            first = fields.get("attempt", 1) == 1 and not fields.get("history")
            tracing.queue_wait(span, carrier, fields.get("enqueued_at") if first else None)
            try:
                envelope = attempt(self, message)
            except ToolCallFailed as exc:
                error = exc.envelope.get("error") or {}
                tracing.set_outcome(span, "failed", error.get("kind"))
                raise
            except Retry_:
                raise  # its outcome (retry or wait) is set where it is decided
            tracing.set_outcome(span, "succeeded")
            return envelope

    def attempt(self: Task, message: Any) -> dict[str, Any]:
        info = self.request.delivery_info or {}
        delivery = Delivery(
            call_id=str(self.request.id),
            worker=str(self.request.hostname),
            queue=info.get("routing_key"),
            # kombu marks a message it restored after its worker vanished; only then can
            # the call have run (or finished) before: first deliveries skip these checks.
            redelivered=bool(info.get("redelivered")),
        )
        if delivery.redelivered:
            stored = self.AsyncResult(delivery.call_id)  # it may have finished: one result only
            if stored.state == states.SUCCESS and isinstance(stored.result, dict):
                return stored.result
            if stored.state == states.FAILURE and isinstance(stored.result, ToolCallFailed):
                raise stored.result
        try:
            decision = handler.handle(message, delivery)
        except SoftTimeLimitExceeded:
            decision = handler.backstop_timeout(message, delivery)
        if isinstance(decision, Final):
            if decision.envelope.get("error"):
                raise ToolCallFailed(decision.envelope)
            return decision.envelope
        retry_message = decision.request.to_message(handler.sealer)
        queue = delivery.queue or app.conf.task_default_queue
        headers = call_headers(
            decision.request, retry_message, delivery.call_id, queue, handler.signer
        )
        if tracing.enabled():  # the next attempt stays in this trace, a child of this one
            tracing.set_current_outcome(_next_step(message, decision))
            tracing.inject_current(headers)
        raise self.retry(
            args=[retry_message],
            kwargs={},
            queue=queue,
            countdown=decision.delay_s,
            priority=broker_priority(decision.request.priority),
            argsrepr=decision.request.describe(),
            kwargsrepr="{}",
            # Re-signed: the next attempt is a new message (its attempt and history).
            headers=headers,
        )

    if chunks is not None:
        _register_chunks(app, chunks)

    @app.task(name=NOOP_TASK, acks_late=True)  # type: ignore[untyped-decorator]
    def noop(payload: Any = None) -> None:
        """Does nothing: the baseline that benchmarks compare a tool call against."""

    return run_tool


def _register_chunks(app: Celery, chunks: ChunkRunner) -> None:
    @app.task(  # type: ignore[untyped-decorator]
        name=RUN_BATCH_TASK,
        bind=True,
        shadow_name=lambda task, args, kwargs, options: chunk_shadow_name(args),
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,  # each call's result is stored under its own id
    )
    def run_batch(self: Task, calls: Any) -> str | None:
        if not tracing.enabled():
            return run_chunk(self, calls)
        info = self.request.delivery_info or {}
        carrier = tracing.headers_of(self.request)
        with tracing.consumer_span(
            "toolq.chunk",
            carrier,
            queue=info.get("routing_key"),
            message_id=str(self.request.id),
            tool_id=None,
            attributes={"messaging.batch.message_count": len(calls)}
            if isinstance(calls, list)
            else None,
        ) as span:
            tracing.queue_wait(span, carrier)
            return run_chunk(self, calls)

    def run_chunk(self: Task, calls: Any) -> str | None:
        info = self.request.delivery_info or {}
        queue = info.get("routing_key")
        try:
            entries = chunk_from_message(calls)
        except InvalidInput as exc:  # the poison check refuses these before they get here
            log.warning("chunk %s refused: %s", self.request.id, exc)
            return None
        chunk = Chunk(
            chunk_id=str(self.request.id),
            worker=str(self.request.hostname),
            queue=queue,
            redelivered=bool(info.get("redelivered")),
            entries=entries,
        )
        report = chunks.run(chunk)
        if report.left:  # out of time before the redelivery timeout: the rest goes back
            send_chunk(app, report.left, queue, chunks.handler.signer)
            chunks.results.handed_off(chunk.chunk_id, [e.call_id for e in report.left])
        return report.summary()  # Flower's result column, from the task-succeeded event


def _next_step(message: Any, decision: Retry) -> str:
    """``retry`` (the next attempt) or ``wait`` (the same attempt, later: a flow-control
    wait or an open breaker's deferral), for the attempt's span."""
    attempt = message.get("attempt", 1) if isinstance(message, dict) else 1
    return "retry" if decision.request.attempt != attempt else "wait"


def retry_publisher(app: Celery, handler: CallHandler) -> Callable[[str, Retry, str | None], None]:
    """How a chunk's call is tried again: a single message under its own id, as
    ``Task.retry`` sends it for a single call."""

    def publish(call_id: str, decision: Retry, queue: str | None) -> None:
        send_call(
            app,
            decision.request,
            call_id,
            queue,
            handler.sealer,
            signer=handler.signer,
            countdown=decision.delay_s,
        )

    return publish


def chunk_shadow_name(args: Any) -> str | None:
    """A chunk's calls share a tool (``ToolClient.map``): Flower shows it under that name."""
    calls = args[0] if isinstance(args, list | tuple) and args else None
    first = calls[0] if isinstance(calls, list) and calls else None
    message = first.get("call") if isinstance(first, dict) else None
    return shadow_name([message])


def shadow_name(args: Any) -> str | None:
    """``toolq:<tool id>``: the name Flower and Celery's logs show for a call."""
    message = args[0] if isinstance(args, list | tuple) and args else None
    tool_id = message.get("tool_id") if isinstance(message, dict) else None
    return f"toolq:{tool_id}" if isinstance(tool_id, str) else None
