"""Turn one queued request into one result envelope.

The Celery task is a thin shell around :meth:`ToolExecutor.execute`: validation,
limits, the Bun run, metadata and the slow-call log all happen here, so every
outcome — bad request included — is a well-formed envelope, never an exception.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from toolq.config.durations import format_duration, parse_duration
from toolq.config.settings import Settings
from toolq.envelope import ToolErrorInfo, ToolResult
from toolq.errors import ConfigError, InvalidInput, ToolFailure
from toolq.validation import validate_env, validate_tool_id
from toolq.workers.bun import find_bun
from toolq.workers.runner import BunRunner, Call, Outcome

log = logging.getLogger("toolq.worker")
slow_log = logging.getLogger("toolq.slow")


class ToolExecutor:
    """Everything a worker process needs to run calls; built once at worker start."""

    def __init__(self, settings: Settings, max_concurrent: int | None = None) -> None:
        self.settings = settings
        entrypoint = settings.entrypoint_path
        if not entrypoint.is_file():
            raise ConfigError(
                f"{settings.source}: runtime.entrypoint: {entrypoint} does not exist",
                key="runtime.entrypoint",
                source=settings.source,
            )
        self.max_concurrent = max_concurrent or settings.performance.max_concurrent_tools
        self.runner = BunRunner(
            bun=find_bun(settings.runtime.bun_path, settings.project_dir),
            entrypoint=entrypoint,
            project_dir=settings.project_dir,
            max_concurrent=self.max_concurrent,
        )

    def execute(self, request: Any, *, call_id: str, worker: str) -> dict[str, Any]:
        started_at = time.time()
        tool_id = str(request.get("tool_id", "")) if isinstance(request, dict) else ""
        try:
            call = self._call(request, call_id)
        except ToolFailure as failure:
            outcome = Outcome(None, ToolErrorInfo.from_failure(failure), 0, 0)
        else:
            outcome = self.runner.run(call)
        finished_at = time.time()
        metadata: dict[str, Any] = {
            "tool_id": tool_id,
            "tool_exec_id": call_id,
            "execution_time": outcome.execution_time_ms,
            "total_time": outcome.total_time_ms,
            "attempts": 1,
            "worker": worker,
            "started_at": started_at,
            "finished_at": finished_at,
        }
        enqueued_at = request.get("enqueued_at") if isinstance(request, dict) else None
        if isinstance(enqueued_at, int | float):
            metadata["enqueued_at"] = enqueued_at
            metadata["queue_wait"] = max(0, int((started_at - enqueued_at) * 1000))
        result = ToolResult(call_id, tool_id, outcome.result, outcome.error, metadata)
        self._log(result, outcome)
        return result.to_dict()

    def _call(self, request: Any, call_id: str) -> Call:
        if not isinstance(request, dict):
            raise InvalidInput("request must be a JSON object", "ValidationError")
        tool_id = validate_tool_id(request.get("tool_id"))
        env = validate_env(request.get("env"))
        call_timeout = request.get("timeout")
        timeout_s: float | None = None
        if call_timeout is not None:
            try:
                timeout_s = parse_duration(call_timeout)
            except ValueError as exc:
                raise InvalidInput(f"timeout: {exc}", "ValidationError") from None
            ceiling = self.settings.max_hard_timeout_s
            if not 0 < timeout_s <= ceiling:
                raise InvalidInput(
                    f"timeout {format_duration(timeout_s)} is outside "
                    f"(0, {format_duration(ceiling)}]: a call may not outlast the longest "
                    "configured hard limit (raise runtime.timeout or the tool's timeout)",
                    "ValidationError",
                )
        return Call(
            tool_id=tool_id,
            tool_exec_id=call_id,
            input=request.get("input"),
            env=env,
            limits=self.settings.limits_for(tool_id, timeout_s),
        )

    def _log(self, result: ToolResult, outcome: Outcome) -> None:
        meta = result.metadata
        if outcome.stderr:
            # Already redacted: the call's env values never reach the log.
            log.debug("tool %s [%s] stderr:\n%s", result.tool_id, result.id, outcome.stderr)
        perf = self.settings.performance
        duration_s = outcome.total_time_ms / 1000
        if perf.log_slow_queries and duration_s >= perf.slow_query_threshold_s:
            slow_log.warning(
                json.dumps(
                    {
                        "event": "slow_tool_call",
                        "tool_id": result.tool_id,
                        "tool_exec_id": result.id,
                        "attempt": meta.get("attempts", 1),
                        "duration_ms": outcome.total_time_ms,
                        "threshold_ms": int(perf.slow_query_threshold_s * 1000),
                        "status": result.status,
                        "worker": meta.get("worker"),
                    }
                )
            )
