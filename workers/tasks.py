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
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, states
from celery.exceptions import SoftTimeLimitExceeded

from toolq.config.celery_app import NOOP_TASK, RUN_TOOL_TASK, broker_priority
from toolq.config.settings import BACKSTOP_MARGIN_S, CELERY_HARD_MARGIN_S
from toolq.errors import ToolCallFailed
from toolq.workers.handler import CallHandler, Delivery, Final


def register_tasks(app: Celery, handler: CallHandler) -> Task:
    """Register ``toolq.run_tool`` on ``app``, bound to this worker's handler."""
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
        raise self.retry(
            args=[decision.request.to_message(handler.sealer)],
            kwargs={},
            countdown=decision.delay_s,
            priority=broker_priority(decision.request.priority),
            argsrepr=decision.request.describe(),
            kwargsrepr="{}",
        )

    @app.task(name=NOOP_TASK, acks_late=True)  # type: ignore[untyped-decorator]
    def noop(payload: Any = None) -> None:
        """Does nothing: the baseline that benchmarks compare a tool call against."""

    return run_tool


def shadow_name(args: Any) -> str | None:
    """``toolq:<tool id>``: the name Flower and Celery's logs show for a call."""
    message = args[0] if isinstance(args, list | tuple) and args else None
    tool_id = message.get("tool_id") if isinstance(message, dict) else None
    return f"toolq:{tool_id}" if isinstance(tool_id, str) else None
