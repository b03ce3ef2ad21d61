"""The Celery task: a thin shell that hands each message to the executor.

A retry is a new message for the same call id, published with a countdown
(Celery's ``Task.retry``): the slot is free while the call waits, any worker may
take the next attempt, and the caller's ``result()`` simply keeps waiting.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, states
from celery.exceptions import SoftTimeLimitExceeded

from toolq.config.celery_app import NOOP_TASK, RUN_TOOL_TASK
from toolq.config.settings import BACKSTOP_MARGIN_S
from toolq.envelope import ToolErrorInfo, ToolResult
from toolq.errors import ToolTimeout
from toolq.request import describe
from toolq.workers.executor import Final, ToolExecutor


def register_tasks(app: Celery, executor: ToolExecutor) -> Task:
    """Register ``toolq.run_tool`` on ``app``, bound to this worker's executor."""
    backstop = executor.settings.max_hard_timeout_s + BACKSTOP_MARGIN_S

    @app.task(  # type: ignore[untyped-decorator]
        name=RUN_TOOL_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,  # the executor's policy decides, not Celery's counter
        # Celery's own limits only back up the runner's, on pools that support them.
        soft_time_limit=backstop,
        time_limit=backstop + 5,
    )
    def run_tool(self: Task, request: dict[str, Any]) -> dict[str, Any]:
        call_id = str(self.request.id)
        delivery = self.request.delivery_info or {}
        # kombu marks a message it restored after its worker vanished; only then can the
        # call have run (or finished) before: first deliveries skip these round trips.
        redelivered = bool(delivery.get("redelivered"))
        if redelivered:
            stored = self.AsyncResult(call_id)
            if stored.state == states.SUCCESS and isinstance(stored.result, dict):
                return stored.result  # it had finished: one final result only
        worker = str(self.request.hostname)
        try:
            decision = executor.handle(
                request,
                call_id=call_id,
                worker=worker,
                queue=delivery.get("routing_key"),
                redelivered=redelivered,
            )
        except SoftTimeLimitExceeded:
            failure = ToolTimeout("Celery's backstop time limit ended the call", "TimeoutError")
            tool_id = str(request.get("tool_id", "")) if isinstance(request, dict) else ""
            return ToolResult(
                call_id,
                tool_id,
                error=ToolErrorInfo.from_failure(failure),
                metadata={
                    "tool_exec_id": call_id,
                    "attempts": 1,
                    "execution_time": 0,
                    "worker": worker,
                },
            ).to_dict()
        if isinstance(decision, Final):
            return decision.envelope
        raise self.retry(
            args=[decision.request],
            kwargs={},
            countdown=decision.delay_s,
            argsrepr=describe(decision.request),
            kwargsrepr="{}",
        )

    @app.task(name=NOOP_TASK, acks_late=True)  # type: ignore[untyped-decorator]
    def noop(payload: Any = None) -> None:
        """Does nothing: the baseline that benchmarks compare a tool call against."""

    return run_tool
