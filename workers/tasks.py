"""The Celery task: a thin shell that hands each message to the executor."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from toolq.config.celery_app import RUN_TOOL_TASK
from toolq.config.settings import BACKSTOP_MARGIN_S
from toolq.envelope import ToolErrorInfo, ToolResult
from toolq.errors import ToolTimeout
from toolq.workers.executor import ToolExecutor


def register_tasks(app: Celery, executor: ToolExecutor) -> Task:
    """Register ``toolq.run_tool`` on ``app``, bound to this worker's executor."""
    backstop = executor.settings.max_hard_timeout_s + BACKSTOP_MARGIN_S

    @app.task(  # type: ignore[untyped-decorator]
        name=RUN_TOOL_TASK,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # Celery's own limits only back up the runner's, on pools that support them.
        soft_time_limit=backstop,
        time_limit=backstop + 5,
    )
    def run_tool(self: Task, request: dict[str, Any]) -> dict[str, Any]:
        call_id = str(self.request.id)
        try:
            return executor.execute(request, call_id=call_id, worker=str(self.request.hostname))
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
                    "worker": str(self.request.hostname),
                },
            ).to_dict()

    return run_tool
