"""Turn one delivered call into either a final envelope or a retry, in small steps:

    decode + validate → cancelled? → guard redelivery → cache → gate (rate token,
    slot) → admit (breaker) → run (runtime) → record (breaker) → decide (retry
    policy) → finish (envelope, dead letter, log)

Every collaborator is passed in — the runtime, breakers, dead letters, delivery
counter, metrics and clock — so each decision can be tested against fakes in
milliseconds (``tests/fast``), while behaviour tests run the same handler with
real Bun, Redis and Celery. Every outcome, a bad message included, ends as a
well-formed envelope, never an exception.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Protocol

from toolq import tracing
from toolq.config.settings import Settings
from toolq.envelope import ToolErrorInfo, ToolResult
from toolq.errors import (
    Cancelled,
    CircuitOpen,
    InvalidInput,
    RateLimited,
    ToolCrashed,
    ToolFailure,
    ToolTimeout,
)
from toolq.logsafe import Block
from toolq.protocol import CallRequest, validate
from toolq.sealing import Sealer, env_fields
from toolq.signing import Signer
from toolq.workers.backoff import RetryPolicy, next_delay
from toolq.workers.breaker import Admission, Verdict, verdict_of
from toolq.workers.cache import Cached, cache_digest
from toolq.workers.flow import LEASE_MARGIN_S, SlotGrant, Token, slot_poll_s
from toolq.workers.metrics import Metrics
from toolq.workers.profile import Profiles, ToolProfile
from toolq.workers.runtime.base import CancelToken, Outcome, Runtime, failed
from toolq.workers.runtime.secrets import redact_outcome

log = logging.getLogger("toolq.worker")
tool_log = logging.getLogger("toolq.tool")
slow_log = logging.getLogger("toolq.slow")

STDERR_LOGGED = 16 * 1024
"""How much of a call's (redacted) stderr goes to the worker log."""
MAX_DELIVERIES = 3
"""A call redelivered this many times (its worker died running it) ends as ``crashed``."""
DEFER_SLACK_S = 0.05
"""A deferred call arrives just after its breaker half-opens, not just before."""
NOT_DEAD_LETTERED = frozenset({"cancelled", "rate_limited"})
"""Ends someone chose (a cancel, a rate refusal): no failure to look into or replay, and a
flood of them would push real failures out of the bounded dead-letter list."""


class BreakerGate(Protocol):
    """Cluster-wide per-tool breakers (:class:`toolq.workers.breaker.Breakers`)."""

    def admit(self, tool_id: str, probe_lease_s: float) -> Admission: ...

    def record(self, tool_id: str, verdict: Verdict, probe: str) -> str: ...


class DeadLetterSink(Protocol):
    def add(self, entry: dict[str, Any]) -> object: ...


class FlowGate(Protocol):
    """Cluster-wide slots and rate tokens (:class:`toolq.workers.flow.Flow`)."""

    def acquire(
        self,
        tool_id: str,
        key: str | None,
        holder: str,
        *,
        limit: int,
        lease_s: float,
        arrival: float,
        priority: int | None = None,
    ) -> SlotGrant: ...

    def release(self, tool_id: str, key: str | None, holder: str) -> int: ...

    def token(
        self,
        tool_id: str,
        holder: str,
        *,
        interval_s: float,
        reserve: bool,
        priority: int | None = None,
    ) -> Token: ...

    def confirm(self, tool_id: str, holder: str) -> float: ...


class CancelRegistry(Protocol):
    """Cancelled call ids (:class:`toolq.workers.cancel.CancelWatch`)."""

    def is_cancelled(self, call_id: str) -> bool: ...

    def running(self, call_id: str) -> AbstractContextManager[CancelToken]: ...


class CacheStore(Protocol):
    """Stored successful results (:class:`toolq.workers.cache.ResultCache`)."""

    def get(self, digest: str) -> Cached | None: ...

    def put(self, digest: str, entry: Cached, ttl_s: float) -> None: ...


class DeliveryCounter(Protocol):
    def count(self, call_id: str, attempt: int) -> int:
        """Count one more delivery of this attempt; return how many there were."""
        ...


@dataclass(frozen=True)
class Delivery:
    """How a message reached this worker."""

    call_id: str
    worker: str
    queue: str | None = None
    redelivered: bool = False
    """kombu restored it after its worker vanished: it may have run (or finished) before."""


@dataclass(frozen=True)
class Final:
    """The call is over: store this envelope as its result."""

    envelope: dict[str, Any]


@dataclass(frozen=True)
class Retry:
    """Run the call again after ``delay_s`` with this (updated) request."""

    request: CallRequest
    delay_s: float


Decision = Final | Retry


@dataclass(frozen=True)
class _Slot:
    """The cluster slot a running call holds (``held`` False: its tool has no cap)."""

    key: str | None = None
    held: bool = False


@dataclass(frozen=True)
class _Attempt:
    """What every step knows about the attempt in hand."""

    message: Any
    request: CallRequest | None
    delivery: Delivery
    started_at: float
    stop: str | None = None


@dataclass
class CallHandler:
    settings: Settings
    profiles: Profiles
    runtime: Runtime
    breakers: BreakerGate
    dead_letters: DeadLetterSink
    deliveries: DeliveryCounter
    metrics: Metrics
    sandbox: str = "none"
    """What isolates tools on this worker (``bwrap`` or ``none``), for the metadata."""
    clock: Callable[[], float] = time.time
    sealer: Sealer | None = None
    """With a secret key: env arrives sealed (plain env is refused) and is dead-lettered sealed."""
    signer: Signer | None = None
    """With a secret key: what this worker re-sends (retries, waits) is signed (toolq.signing)."""
    flow: FlowGate | None = None
    cancels: CancelRegistry | None = None
    cache: CacheStore | None = None

    def handle(self, message: Any, delivery: Delivery) -> Decision:
        started_at = self.clock()
        try:
            request = validate(CallRequest.from_message(message, self.sealer), self.settings)
        except InvalidInput as refused:
            return self._finish(_Attempt(message, None, delivery, started_at), failed(refused))
        attempt = _Attempt(message, request, delivery, started_at)
        profile = self.profiles[request.tool_id]
        policy = profile.retry.overridden(
            max_attempts=request.max_attempts, enabled=None if request.retry else False
        )
        deadline = (request.enqueued_at or started_at) + policy.max_elapsed_s

        if self.cancels is not None and self.cancels.is_cancelled(delivery.call_id):
            self._leave_waiting(request, profile, delivery.call_id)
            stopped = Cancelled("the call was cancelled before it ran", "Cancelled")
            return self._finish(attempt, failed(stopped))

        if delivery.redelivered:
            redeliveries = self._count_redelivery(delivery, request)
            if redeliveries >= MAX_DELIVERIES:
                lost = ToolCrashed(
                    f"this call was redelivered {MAX_DELIVERIES} times (its worker died or was "
                    "stopped while running it); giving up",
                    "WorkerLost",
                )
                return self._finish(_with_stop(attempt, "max_deliveries"), failed(lost))
            # The lost delivery goes into the attempt history (and the count of attempts).
            request = _with_redelivery(request, redeliveries, self.clock())
            attempt = _Attempt(message, request, delivery, started_at)

        digest = self._digest(request, profile)
        if digest is not None:
            hit = self._cache_get(digest, request.tool_id)
            if hit is not None:
                self.metrics.cache_hits.labels(request.tool_id).inc()
                return self._finish(attempt, Outcome(hit.result, None, 0, 0), cached=hit)

        slot = self._gate(attempt, request, profile)
        if not isinstance(slot, _Slot):
            return slot
        try:
            if request.attempt == 1 and not request.history and request.enqueued_at:
                wait = max(0.0, started_at - request.enqueued_at)
                self.metrics.queue_wait_seconds.labels(request.tool_id).observe(wait)

            admission = self._admit(profile)
            if not admission.allowed:
                return self._refuse_open(attempt, request, admission, policy, deadline)

            outcome = self._run(request, delivery, profile)
        finally:
            if slot.held:
                self._release(request.tool_id, slot.key, delivery.call_id)
        counted = self._record(request, profile, outcome, admission)
        if outcome.error is None:
            if digest is not None:
                self._cache_put(digest, profile, Cached(outcome.result, delivery.call_id))
            return self._finish(attempt, outcome)
        delay, stop = next_delay(
            attempt=request.attempt,
            error=outcome.error,
            policy=policy,
            now=self.clock(),
            deadline=deadline,
        )
        if delay is None:
            return self._finish(_with_stop(attempt, stop), outcome)
        self.metrics.retries.labels(request.tool_id, outcome.error.kind).inc()
        entry = {
            "attempt": request.attempt,
            "kind": outcome.error.kind,
            "name": outcome.error.name,
            "message": outcome.error.message,
            "delay": round(delay, 3),
            "worker": delivery.worker,
        }
        return Retry(request.next_attempt(entry, counted=counted), delay)

    def backstop_timeout(self, message: Any, delivery: Delivery) -> Final:
        """Celery's own time limit fired (the runtime's never did): end the call."""
        request = _decoded(message, self.sealer)
        attempt = _Attempt(message, request, delivery, self.clock())
        stopped = ToolTimeout("Celery's backstop time limit ended the call", "TimeoutError")
        return self._finish(attempt, failed(stopped))

    # -- steps ---------------------------------------------------------------------------

    def _digest(self, request: CallRequest, profile: ToolProfile) -> str | None:
        """The cache key of a call whose tool caches (and that did not opt out)."""
        if profile.flow.cache_ttl_s is None or self.cache is None or not request.cache:
            return None
        return cache_digest(request.tool_id, request.input, profile.config_for(request))

    def _cache_get(self, digest: str, tool_id: str) -> Cached | None:
        assert self.cache is not None
        try:
            return self.cache.get(digest)
        except Exception:  # a cache that cannot answer is a miss
            log.warning("result cache unavailable for %s; running the tool", tool_id)
            return None

    def _cache_put(self, digest: str, profile: ToolProfile, entry: Cached) -> None:
        assert self.cache is not None and profile.flow.cache_ttl_s is not None
        try:
            self.cache.put(digest, entry, profile.flow.cache_ttl_s)
        except Exception:
            log.warning("cannot cache %s's result", profile.tool_id)

    def _gate(
        self, attempt: _Attempt, request: CallRequest, profile: ToolProfile
    ) -> _Slot | Decision:
        """A rate token, then a cluster slot; or a re-publication to wait for them
        (holding no worker slot), or the end in ``reject`` mode. A tool with neither
        configured passes without a round trip; without Redis, calls pass (logged)."""
        if not profile.flow.gated or self.flow is None:
            return _Slot()
        try:
            token_at = self._take_token(attempt, request, profile)
            if not isinstance(token_at, float | None):
                return token_at
            return self._take_slot(attempt, request, profile, token_at)
        except Exception:
            log.warning(
                "flow control for %s unavailable; letting the call through", request.tool_id
            )
            return _Slot()

    def _take_token(
        self, attempt: _Attempt, request: CallRequest, profile: ToolProfile
    ) -> Decision | float | None:
        """The time of the call's rate token (None: the tool has no rate limit), or the
        decision to wait for the reserved one (again, if a more urgent call took its
        place) or to refuse the call."""
        interval_s, tool_id = profile.flow.rate_interval_s, request.tool_id
        if interval_s is None:
            return None
        if request.rate_token_at is not None:
            moved_s = self.flow_gate.confirm(tool_id, attempt.delivery.call_id)
            if moved_s <= 0:
                return request.rate_token_at
            token_at = self.clock() + moved_s
            return Retry(replace(request, rate_token_at=token_at, waits=request.waits + 1), moved_s)
        token = self.flow_gate.token(
            tool_id,
            attempt.delivery.call_id,
            interval_s=interval_s,
            reserve=not profile.flow.reject_over_rate,
            priority=request.priority,
        )
        self.metrics.waiting_calls.labels(tool_id, "rate").set(token.waiting)
        if not token.granted:
            self.metrics.rate_limited.labels(tool_id, "rejected").inc()
            refused = RateLimited(
                f"tool {tool_id} is over its rate limit; the next call is allowed in "
                f"{token.wait_s:.3f}s",
                "RateLimited",
            )
            return self._finish(attempt, failed(refused))
        if token.wait_s > 0:
            self.metrics.rate_limited.labels(tool_id, "queued").inc()
            token_at = self.clock() + token.wait_s
            return Retry(
                replace(request, rate_token_at=token_at, waits=request.waits + 1), token.wait_s
            )
        return self.clock()

    def _take_slot(
        self, attempt: _Attempt, request: CallRequest, profile: ToolProfile, token_at: float | None
    ) -> _Slot | Decision:
        """A cluster slot, leased for the call's hard limit + margin; or wait for one,
        keeping the rate token the call already holds."""
        limit, tool_id = profile.flow.max_concurrency, request.tool_id
        if limit is None:
            return _Slot()
        key = profile.flow.slot_key(request.input)
        hard_s = profile.time_limits.for_call(request.timeout_s).hard_timeout_s
        grant = self.flow_gate.acquire(
            tool_id,
            key,
            attempt.delivery.call_id,
            limit=limit,
            lease_s=hard_s + LEASE_MARGIN_S,
            arrival=request.enqueued_at or attempt.started_at,
            priority=request.priority,
        )
        self.metrics.slots_in_use.labels(tool_id).set(grant.in_use)
        self.metrics.waiting_calls.labels(tool_id, "slot").set(grant.waiting)
        if grant.granted:
            return _Slot(key, held=True)
        waiting = replace(request, rate_token_at=token_at, waits=request.waits + 1)
        return Retry(waiting, slot_poll_s(grant.rank, limit))

    @property
    def flow_gate(self) -> FlowGate:
        assert self.flow is not None
        return self.flow

    def _release(self, tool_id: str, key: str | None, call_id: str) -> None:
        try:
            in_use = self.flow_gate.release(tool_id, key, call_id)
        except Exception:  # the lease runs out by itself
            log.warning("cannot release %s's slot for call %s", tool_id, call_id)
            return
        self.metrics.slots_in_use.labels(tool_id).set(in_use)

    def _leave_waiting(self, request: CallRequest, profile: ToolProfile, call_id: str) -> None:
        """A cancelled call leaves its place in the slot's waiting list at once."""
        if profile.flow.max_concurrency is not None and self.flow is not None:
            self._release(request.tool_id, profile.flow.slot_key(request.input), call_id)

    def _count_redelivery(self, delivery: Delivery, request: CallRequest) -> int:
        """This attempt's redeliveries so far, this one included (a call that kills its
        worker must not loop through every worker forever)."""
        try:
            return self.deliveries.count(delivery.call_id, request.attempt)
        except Exception:  # counting is best effort: without Redis, run the call
            log.warning("cannot count deliveries of %s; running it", delivery.call_id)
            return 1

    def _admit(self, profile: ToolProfile) -> Admission:
        if not profile.breaker.enabled:
            return Admission(True, "disabled")
        try:
            # The probe lease outlives the probe itself, so it is never handed out twice.
            admission = self.breakers.admit(profile.tool_id, profile.time_limits.backstop_s)
        except Exception:
            log.warning("breaker for %s unavailable; letting the call through", profile.tool_id)
            return Admission(True, "unknown")
        self.metrics.observe_breaker(profile.tool_id, admission.state)
        return admission

    def _refuse_open(
        self,
        attempt: _Attempt,
        request: CallRequest,
        admission: Admission,
        policy: RetryPolicy,
        deadline: float,
    ) -> Decision:
        """An open breaker: wait for it (without spending an attempt) if the deadline
        allows, else end as ``circuit_open``."""
        wait = admission.retry_in_s + DEFER_SLACK_S
        if policy.enabled and self.clock() + wait <= deadline:
            self.metrics.deferrals.labels(request.tool_id).inc()
            entry = {
                "attempt": request.attempt,
                "kind": "circuit_open",
                "deferred": True,
                "message": f"breaker {admission.state}",
                "delay": round(wait, 3),
            }
            return Retry(request.next_attempt(entry, same_attempt=True), wait)
        why = "deadline" if policy.enabled else "disabled"
        own = _own_last_failure(request)
        if own is not None:
            # The call already failed on its own; that, not the breaker its failures may
            # have opened, is how it ended.
            return self._finish(_with_stop(attempt, why), Outcome(None, own, 0, 0))
        refused = CircuitOpen(
            f"circuit breaker for {request.tool_id} is {admission.state}; "
            f"it lets a call through in {admission.retry_in_s:.1f}s",
            "CircuitOpen",
        )
        return self._finish(_with_stop(attempt, why), failed(refused))

    def _run(self, request: CallRequest, delivery: Delivery, profile: ToolProfile) -> Outcome:
        try:
            call = profile.call(request, delivery.call_id)  # config and env of its definition
        except InvalidInput as refused:
            return failed(refused)
        running = (
            self.cancels.running(delivery.call_id)
            if self.cancels is not None
            else nullcontext(None)
        )
        with running as token, self.metrics.running():
            if token is not None:
                call = replace(call, cancel=token)
            # Env values (the call's and its definition's) never leave in an error, a stack
            # or stderr (stored, logged, retried).
            with tracing.run_span(request.tool_id) as span:
                outcome = redact_outcome(profile.check_output(self.runtime.run(call)), call.env)
                tracing.record_output(span, outcome.stderr)  # redacted above
        self.metrics.observe_run(request.tool_id, outcome)
        return outcome

    def _record(
        self, request: CallRequest, profile: ToolProfile, outcome: Outcome, admission: Admission
    ) -> bool:
        """Tell the breaker how this attempt went; True if it counted for the call.

        A call counts once, whatever its attempts: after its first counted attempt the
        others are not reported — except a half-open probe, whose verdict is the test of
        the tool's health (and whose lease must be handed back)."""
        if admission.state in ("disabled", "unknown"):
            return False
        shortened = (
            request.timeout_s is not None and request.timeout_s < profile.time_limits.timeout_s
        )
        verdict = verdict_of(
            outcome.error,
            non_retryable_errors=profile.retry.non_retryable_errors,
            shortened=shortened,
        )
        if not admission.probe and (request.counted or verdict == "neutral"):
            return False
        try:
            state = self.breakers.record(profile.tool_id, verdict, admission.probe)
        except Exception:
            log.warning("cannot record %s's outcome in its breaker", profile.tool_id)
            return False
        self.metrics.observe_breaker(profile.tool_id, state)
        if state == "open" and admission.state != "open":
            log.warning("circuit breaker for %s is open", profile.tool_id)
        return verdict != "neutral"

    def _finish(self, attempt: _Attempt, outcome: Outcome, cached: Cached | None = None) -> Final:
        """The envelope of a call that is over; a failed one is dead-lettered (unless it
        ended by choice: :data:`NOT_DEAD_LETTERED`)."""
        request, delivery = attempt.request, attempt.delivery
        tool_id = request.tool_id if request is not None else _raw(attempt.message, "tool_id")
        metadata: dict[str, Any] = {
            "tool_id": tool_id,
            "tool_exec_id": delivery.call_id,
            "execution_time": outcome.execution_time_ms,
            "total_time": outcome.total_time_ms,
            "attempts": _attempts(request),
            "attempt_history": [dict(h) for h in request.history] if request else [],
            "worker": delivery.worker,
            "sandbox": self.sandbox,
            "started_at": attempt.started_at,
            "finished_at": self.clock(),
        }
        if attempt.stop is not None:
            metadata["retry_stopped"] = attempt.stop
        if request is not None and request.waits:
            metadata["flow_waits"] = request.waits
        if request is not None and request.priority is not None:
            metadata["priority"] = request.priority
        if cached is not None:
            metadata["cached"] = True
            metadata["cached_from"] = cached.call_id
        if request is not None and request.enqueued_at:
            metadata["enqueued_at"] = request.enqueued_at
            metadata["queue_wait"] = max(0, int((attempt.started_at - request.enqueued_at) * 1000))
        result = ToolResult(delivery.call_id, tool_id, outcome.result, outcome.error, metadata)
        if outcome.error is not None and outcome.error.kind not in NOT_DEAD_LETTERED:
            self.metrics.dead_letters.labels(tool_id).inc()
            self._dead_letter(attempt, result)
        self._log(result, outcome)
        return Final(result.to_dict())

    def _dead_letter(self, attempt: _Attempt, result: ToolResult) -> None:
        request = attempt.request
        entry = {
            "id": result.id,
            "tool_id": result.tool_id,
            "input": request.input if request else _raw(attempt.message, "input", None),
            **self._env_fields(attempt),
            "config": request.config if request else _raw(attempt.message, "config", None),
            "timeout": request.timeout_s if request else _raw(attempt.message, "timeout", None),
            "queue": attempt.delivery.queue,
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

    def _env_fields(self, attempt: _Attempt) -> dict[str, Any]:
        """The env as a dead letter keeps it: sealed whenever this worker has a key."""
        request, message = attempt.request, attempt.message
        if request is not None:
            return env_fields(request.env, request.env_sealed, self.sealer)
        raw = _raw(message, "env", {}), _raw(message, "env_sealed", None)
        return env_fields(*raw, self.sealer)

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


def _with_redelivery(request: CallRequest, redeliveries: int, now: float) -> CallRequest:
    """``request`` with its lost deliveries in its history: one entry per attempt, saying
    how many times the attempt was delivered again after its worker was lost."""
    entry = {
        "attempt": request.attempt,
        "kind": "crashed",
        "name": "WorkerLost",
        "message": (
            "the worker this attempt was delivered to was lost before it ended (killed, "
            "frozen or cut off from Redis); Redis delivered it again"
        ),
        "redeliveries": redeliveries,
        "at": now,
    }
    kept = [
        h
        for h in request.history
        if not (h.get("redeliveries") and h.get("attempt") == request.attempt)
    ]
    return replace(request, history=(*kept, entry))


def _attempts(request: CallRequest | None) -> int:
    """How many times the call was tried: its attempts, and their deliveries lost with a
    worker (a redelivered attempt ran, or may have run, more than once)."""
    if request is None:
        return 1
    lost = sum(int(h.get("redeliveries") or 0) for h in request.history)
    return request.attempt + lost


def _with_stop(attempt: _Attempt, stop: str | None) -> _Attempt:
    return _Attempt(attempt.message, attempt.request, attempt.delivery, attempt.started_at, stop)


def _own_last_failure(request: CallRequest) -> ToolErrorInfo | None:
    """The call's own last failed attempt (deferrals are not attempts), if it had one."""
    for entry in reversed(request.history):
        if not entry.get("deferred") and entry.get("kind"):
            return ToolErrorInfo(
                kind=str(entry["kind"]),
                message=str(entry.get("message", "")),
                name=str(entry.get("name") or "Error"),
            )
    return None


def _decoded(message: Any, sealer: Sealer | None) -> CallRequest | None:
    try:
        return CallRequest.from_message(message, sealer)
    except ToolFailure:
        return None


def _raw(message: Any, key: str, default: Any = "") -> Any:
    """A field of a message that could not be decoded, as far as it can be read."""
    if not isinstance(message, Mapping):
        return default
    value = message.get(key, default)
    return str(value) if key == "tool_id" else value
