"""Step 9, finish: every call that is over — a bad message, a refusal, a success or a
final failure — ends here as one well-formed envelope; a failure is dead-lettered
(unless it ended by choice: :data:`NOT_DEAD_LETTERED`) and each end is logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from toolq.config.settings import Settings
from toolq.envelope import ToolResult
from toolq.logsafe import Block
from toolq.protocol import CallRequest
from toolq.sealing import Sealer, env_fields
from toolq.workers.call.attempt import Ended, Final, Received
from toolq.workers.call.decode import raw_field
from toolq.workers.call.ports import DeadLetterSink
from toolq.workers.metrics import Metrics
from toolq.workers.runtime.base import Outcome

log = logging.getLogger("toolq.worker")
tool_log = logging.getLogger("toolq.tool")
slow_log = logging.getLogger("toolq.slow")

STDERR_LOGGED = 16 * 1024
"""How much of a call's (redacted) stderr goes to the worker log."""
NOT_DEAD_LETTERED = frozenset({"cancelled", "rate_limited"})
"""Ends someone chose (a cancel, a rate refusal): no failure to look into or replay, and a
flood of them would push real failures out of the bounded dead-letter list."""


@dataclass
class Finish:
    """Builds the envelope of a call that is over, dead-letters it if it failed, logs it."""

    settings: Settings
    metrics: Metrics
    dead_letters: DeadLetterSink
    sandbox: str
    clock: Callable[[], float]

    def __call__(
        self,
        received: Received,
        request: CallRequest | None,
        ended: Ended,
        sealer: Sealer | None,
    ) -> Final:
        """``request`` None: the message could not be decoded (its raw fields are kept as
        far as they read). ``sealer``: the worker's key, which seals a dead letter's env."""
        delivery, outcome = received.delivery, ended.outcome
        tool_id = request.tool_id if request is not None else raw_field(received.message, "tool_id")
        metadata: dict[str, Any] = {
            "tool_id": tool_id,
            "tool_exec_id": delivery.call_id,
            "execution_time": outcome.execution_time_ms,
            "total_time": outcome.total_time_ms,
            "attempts": _attempts(request),
            "attempt_history": [dict(h) for h in request.history] if request else [],
            "worker": delivery.worker,
            "sandbox": self.sandbox,
            "started_at": received.started_at,
            "finished_at": self.clock(),
        }
        if ended.stop is not None:
            metadata["retry_stopped"] = ended.stop
        if request is not None and request.waits:
            metadata["flow_waits"] = request.waits
        if request is not None and request.priority is not None:
            metadata["priority"] = request.priority
        if ended.cached is not None:
            metadata["cached"] = True
            metadata["cached_from"] = ended.cached.call_id
        if request is not None and request.enqueued_at:
            metadata["enqueued_at"] = request.enqueued_at
            metadata["queue_wait"] = max(0, int((received.started_at - request.enqueued_at) * 1000))
        result = ToolResult(delivery.call_id, tool_id, outcome.result, outcome.error, metadata)
        if outcome.error is not None and outcome.error.kind not in NOT_DEAD_LETTERED:
            self.metrics.dead_letters.labels(tool_id).inc()
            self._dead_letter(received, request, result, sealer)
        self._log(result, outcome)
        return Final(result.to_dict())

    def _dead_letter(
        self,
        received: Received,
        request: CallRequest | None,
        result: ToolResult,
        sealer: Sealer | None,
    ) -> None:
        message = received.message
        entry = {
            "id": result.id,
            "tool_id": result.tool_id,
            "input": request.input if request else raw_field(message, "input", None),
            **_env_fields(message, request, sealer),
            "config": request.config if request else raw_field(message, "config", None),
            "timeout": request.timeout_s if request else raw_field(message, "timeout", None),
            "queue": received.delivery.queue,
            "error": result.error.to_dict() if result.error else None,
            "attempts": result.metadata.get("attempts"),
            "attempt_history": result.metadata.get("attempt_history"),
            "retry_stopped": result.metadata.get("retry_stopped"),
            "worker": result.metadata.get("worker"),
        }
        try:
            self.dead_letters.add(entry)
        except Exception:
            log.warning("cannot dead-letter call %s", result.id, exc_info=True)

    def _log(self, result: ToolResult, outcome: Outcome) -> None:
        meta = result.metadata
        log.info(
            "call %s %s: %s in %d ms (attempt %s)",
            result.id,
            result.tool_id,
            result.error.kind if result.error else "success",
            outcome.total_time_ms,
            meta.get("attempts"),
        )
        if outcome.stderr:
            # Already redacted: the call's env values never reach the log.
            tool_log.info(
                "call %s %s stderr:\n%s",
                result.id,
                result.tool_id,
                Block(outcome.stderr[-STDERR_LOGGED:]),  # its lines can never pass for the log's
            )
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


def _env_fields(message: Any, request: CallRequest | None, sealer: Sealer | None) -> dict[str, Any]:
    """The env as a dead letter keeps it: sealed whenever this worker has a key."""
    if request is not None:
        return env_fields(request.env, request.env_sealed, sealer)
    raw = raw_field(message, "env", {}), raw_field(message, "env_sealed", None)
    return env_fields(*raw, sealer)


def _attempts(request: CallRequest | None) -> int:
    """How many times the call was tried: its attempts, and their deliveries lost with a
    worker (a redelivered attempt ran, or may have run, more than once)."""
    if request is None:
        return 1
    lost = sum(int(h.get("redeliveries") or 0) for h in request.history)
    return request.attempt + lost
