"""Turn one delivered request into either a final envelope or a retry.

The Celery task is a thin shell around :meth:`ToolExecutor.handle`: validation,
limits, the circuit breaker, the Bun run, the retry decision, the dead-letter
list and the slow-call log all happen here, so every outcome — a bad request
included — ends as a well-formed envelope, never an exception.

A request is a JSON object::

    {"tool_id", "input", "env", "timeout"?, "enqueued_at",       # from the producer
     "retry"?: {"max_attempts"?, "enabled"?},                     # per-call overrides
     "attempt", "history"}                                         # added on retries
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from toolq import keys
from toolq.config.connections import redis_client
from toolq.config.durations import format_duration, parse_duration
from toolq.config.settings import Settings
from toolq.envelope import ToolErrorInfo, ToolResult
from toolq.errors import CircuitOpen, ConfigError, InvalidInput, ToolCrashed, ToolFailure
from toolq.validation import validate_env, validate_tool_id
from toolq.workers import metrics
from toolq.workers.backoff import RetryPolicy, next_delay
from toolq.workers.breaker import Admission, Breakers, outcome_of
from toolq.workers.bun import WRAPPER, find_bun
from toolq.workers.deadletter import DeadLetters
from toolq.workers.launch import Launcher
from toolq.workers.limits import Cgroups, ResourceLimits
from toolq.workers.runner import BunRunner, Call, Outcome
from toolq.workers.sandbox import Permissions, make_sandbox
from toolq.workers.warm import WarmPool

log = logging.getLogger("toolq.worker")
tool_log = logging.getLogger("toolq.tool")
slow_log = logging.getLogger("toolq.slow")
STDERR_LOGGED = 16 * 1024
"""How much of a call's (redacted) stderr goes to the worker log."""

MAX_DELIVERIES = 3
"""A call redelivered this many times (its worker died running it) ends as ``crashed``."""
_DEFER_SLACK_S = 0.05  # arrive just after the breaker half-opens, not just before


@dataclass(frozen=True)
class Final:
    """The call is over: store this envelope as its result."""

    envelope: dict[str, Any]


@dataclass(frozen=True)
class Retry:
    """Run the call again after ``delay_s`` with this (updated) request."""

    request: dict[str, Any]
    delay_s: float


Decision = Final | Retry


class ToolExecutor:
    """Everything a worker process needs to run calls; built once at worker start."""

    def __init__(
        self,
        settings: Settings,
        max_concurrent: int | None = None,
        warm_processes: int | None = None,
    ) -> None:
        self.settings = settings
        entrypoint = settings.entrypoint_path
        if not entrypoint.is_file():
            raise ConfigError(
                f"{settings.source}: runtime.entrypoint: {entrypoint} does not exist",
                key="runtime.entrypoint",
                source=settings.source,
            )
        self.max_concurrent = max_concurrent or settings.performance.max_concurrent_tools
        bun = find_bun(settings.runtime.bun_path, settings.project_dir)
        self.launcher = Launcher(
            bun,
            entrypoint,
            settings.project_dir,
            sandbox=make_sandbox(
                settings.runtime.sandbox, bun, WRAPPER, settings.project_dir, entrypoint
            ),
            cgroups=Cgroups.detect(),
        )
        if self.launcher.cgroups is None:
            log.warning(
                "no cgroup can be made here: memory is watched by RSS, processes are not limited"
            )
        # One cap for both: warm and spawn calls together never exceed max_concurrent.
        slots = threading.BoundedSemaphore(self.max_concurrent)
        self.runner = BunRunner(self.launcher, self.max_concurrent, slots=slots)
        self.warm: WarmPool | None = None
        if settings.uses_warm_mode:
            self.warm = WarmPool(
                self.launcher,
                warm_processes or self.max_concurrent,
                max_calls_per_process=settings.runtime.max_calls_per_process,
                max_rss_mb=settings.runtime.max_process_rss_mb,
                permissions=Permissions.parse(settings.runtime.permissions),
                resources=ResourceLimits(**settings.resource_limits("")),
                slots=slots,
            )
        self.redis = redis_client(settings)
        self.breakers = Breakers(self.redis, settings.breaker_settings)
        self.dead_letters = DeadLetters.from_settings(self.redis, settings)

    def close(self) -> None:
        """Stop the warm Bun processes and the Redis connection."""
        if self.warm is not None:
            self.warm.close()
        self.redis.close()

    def handle(
        self,
        request: Any,
        *,
        call_id: str,
        worker: str,
        queue: str | None = None,
        redelivered: bool = False,
    ) -> Decision:
        started_at = time.time()
        if not isinstance(request, dict):
            refused = InvalidInput("request must be a JSON object", "ValidationError")
            return self._final({}, call_id, worker, queue, _failed(refused), started_at, None)
        try:
            call = self._call(request, call_id)
        except ToolFailure as invalid:
            return self._final(request, call_id, worker, queue, _failed(invalid), started_at, None)

        attempt = int(request.get("attempt", 1))
        policy = self._policy(call.tool_id, request)
        deadline = float(request.get("enqueued_at", started_at)) + policy.max_elapsed_s

        if redelivered and self._redelivered_too_often(call_id, attempt):
            failure = ToolCrashed(
                f"this call was redelivered {MAX_DELIVERIES} times (its worker died or was "
                "stopped while running it); giving up",
                "WorkerLost",
            )
            return self._final(
                request, call_id, worker, queue, _failed(failure), started_at, "max_deliveries"
            )

        if attempt == 1 and not request.get("history"):
            enqueued_at = request.get("enqueued_at")
            if isinstance(enqueued_at, int | float):
                metrics.QUEUE_WAIT_SECONDS.labels(call.tool_id).observe(
                    max(0.0, started_at - enqueued_at)
                )

        admission = self._admit(call)
        if not admission.allowed:
            wait = admission.retry_in_s + _DEFER_SLACK_S
            if policy.enabled and time.time() + wait <= deadline:
                metrics.DEFERRALS.labels(call.tool_id).inc()
                entry = {
                    "attempt": attempt,
                    "kind": "circuit_open",
                    "deferred": True,
                    "message": f"breaker {admission.state}",
                    "delay": round(wait, 3),
                }
                return Retry(_with_history(request, entry, attempt), wait)
            refused_open = CircuitOpen(
                f"circuit breaker for {call.tool_id} is {admission.state}; "
                f"it lets a call through in {admission.retry_in_s:.1f}s",
                "CircuitOpen",
            )
            why = "deadline" if policy.enabled else "disabled"
            return self._final(
                request, call_id, worker, queue, _failed(refused_open), started_at, why
            )

        with metrics.running():
            if (
                self.warm is not None
                and self.settings.mode_for(call.tool_id) == "warm"
                and not self.settings.has_own_sandbox(call.tool_id)
            ):
                outcome = self.warm.run(call)
            else:
                outcome = self.runner.run(call)
        _observe(call.tool_id, outcome)
        self._record(call.tool_id, outcome, admission)
        if outcome.error is None:
            return self._final(request, call_id, worker, queue, outcome, started_at, None)
        delay, stop = next_delay(
            attempt=attempt,
            error=outcome.error,
            policy=policy,
            now=time.time(),
            deadline=deadline,
        )
        if delay is not None:
            metrics.RETRIES.labels(call.tool_id, outcome.error.kind).inc()
            entry = {
                "attempt": attempt,
                "kind": outcome.error.kind,
                "message": outcome.error.message,
                "delay": round(delay, 3),
                "worker": worker,
            }
            return Retry(_with_history(request, entry, attempt + 1), delay)
        return self._final(request, call_id, worker, queue, outcome, started_at, stop)

    # -- steps ---------------------------------------------------------------------------

    def _call(self, request: dict[str, Any], call_id: str) -> Call:
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
            permissions=Permissions.parse(self.settings.permissions_for(tool_id)),
            resources=ResourceLimits(**self.settings.resource_limits(tool_id)),
        )

    def _policy(self, tool_id: str, request: dict[str, Any]) -> RetryPolicy:
        policy = RetryPolicy(**self.settings.retry_settings(tool_id))
        overrides = request.get("retry") or {}
        if not isinstance(overrides, dict):
            return policy
        max_attempts = overrides.get("max_attempts")
        enabled = overrides.get("enabled")
        return policy.overridden(
            max_attempts=int(max_attempts) if isinstance(max_attempts, int) else None,
            enabled=enabled if isinstance(enabled, bool) else None,
        )

    def _redelivered_too_often(self, call_id: str, attempt: int) -> bool:
        """Count redeliveries of this attempt: a call that kills its worker must not loop."""
        key = keys.deliveries(call_id, attempt)
        try:
            with self.redis.pipeline() as pipe:
                pipe.incr(key)
                pipe.expire(key, int(self.settings.redelivery_s * (MAX_DELIVERIES + 2)))
                count, _ = pipe.execute()
        except redis.RedisError:
            log.warning("cannot count deliveries of %s; running it", call_id, exc_info=True)
            return False
        return int(count) >= MAX_DELIVERIES

    def _admit(self, call: Call) -> Admission:
        if not self.breakers.enabled(call.tool_id):
            return Admission(True, "disabled")
        try:
            # The probe lease outlives the probe itself, so it is never handed out twice.
            admission = self.breakers.get(call.tool_id).admit(call.limits.backstop_s)
            metrics.observe_breaker(call.tool_id, admission.state)
            return admission
        except redis.RedisError:
            log.warning(
                "breaker for %s unavailable; letting the call through", call.tool_id, exc_info=True
            )
            return Admission(True, "unknown")

    def _record(self, tool_id: str, outcome: Outcome, admission: Admission) -> None:
        if admission.state in ("disabled", "unknown"):
            return
        kind = outcome.error.kind if outcome.error else None
        try:
            state = self.breakers.get(tool_id).record(outcome_of(kind), admission.probe)
        except redis.RedisError:
            log.warning("cannot record %s's outcome in its breaker", tool_id, exc_info=True)
            return
        metrics.observe_breaker(tool_id, state)
        if state == "open" and admission.state != "open":
            log.warning("circuit breaker for %s is open", tool_id)

    def _final(
        self,
        request: dict[str, Any],
        call_id: str,
        worker: str,
        queue: str | None,
        outcome: Outcome,
        started_at: float,
        stop: str | None,
    ) -> Final:
        tool_id = str(request.get("tool_id", ""))
        history = list(request.get("history") or [])
        attempt = int(request.get("attempt", 1))
        metadata: dict[str, Any] = {
            "tool_id": tool_id,
            "tool_exec_id": call_id,
            "execution_time": outcome.execution_time_ms,
            "total_time": outcome.total_time_ms,
            "attempts": attempt,
            "attempt_history": history,
            "worker": worker,
            "sandbox": "bwrap" if self.launcher.sandbox is not None else "none",
            "started_at": started_at,
            "finished_at": time.time(),
        }
        if stop is not None:
            metadata["retry_stopped"] = stop
        enqueued_at = request.get("enqueued_at")
        if isinstance(enqueued_at, int | float):
            metadata["enqueued_at"] = enqueued_at
            metadata["queue_wait"] = max(0, int((started_at - enqueued_at) * 1000))
        result = ToolResult(call_id, tool_id, outcome.result, outcome.error, metadata)
        if outcome.error is not None:
            metrics.DEAD_LETTERS.labels(tool_id).inc()
            self._dead_letter(request, result, queue)
        self._log(result, outcome)
        return Final(result.to_dict())

    def _dead_letter(self, request: dict[str, Any], result: ToolResult, queue: str | None) -> None:
        entry = {
            "id": result.id,
            "tool_id": result.tool_id,
            "input": request.get("input"),
            "env": request.get("env") or {},
            "timeout": request.get("timeout"),
            "queue": queue,
            "error": result.error.to_dict() if result.error else None,
            "attempts": result.metadata.get("attempts"),
            "attempt_history": result.metadata.get("attempt_history"),
            "retry_stopped": result.metadata.get("retry_stopped"),
            "worker": result.metadata.get("worker"),
        }
        try:
            self.dead_letters.add(entry)
        except (redis.RedisError, TypeError, ValueError):
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
                "call %s %s stderr:\n%s", result.id, result.tool_id, outcome.stderr[-STDERR_LOGGED:]
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


def _observe(tool_id: str, outcome: Outcome) -> None:
    kind = outcome.error.kind if outcome.error else None
    label = "success" if kind is None else "timeout" if kind == "timeout" else "error"
    metrics.TOOL_EXECUTE_SECONDS.labels(tool_id, label).observe(outcome.total_time_ms / 1000)
    metrics.TOOL_OUTPUT_BYTES.labels(tool_id).observe(outcome.output_bytes)
    if kind is not None:
        metrics.TOOL_ERRORS.labels(tool_id, kind).inc()
    if kind == "timeout":
        metrics.TOOL_TIMEOUTS.labels(tool_id).inc()
    if outcome.exit_code is not None or outcome.exit_signal is not None:
        status = "ok" if outcome.exit_code == 0 else "error"
        code = "" if outcome.exit_code is None else str(outcome.exit_code)
        metrics.BUN_EXITS.labels(status, code, outcome.exit_signal or "").inc()


def _failed(failure: ToolFailure) -> Outcome:
    return Outcome(None, ToolErrorInfo.from_failure(failure), 0, 0)


def _with_history(request: dict[str, Any], entry: dict[str, Any], attempt: int) -> dict[str, Any]:
    history = [*list(request.get("history") or []), {**entry, "at": time.time()}]
    return {**request, "attempt": attempt, "history": history}
