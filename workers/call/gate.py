"""Step 4, gate: flow control before a call takes its worker slot — a rate token, then
a cluster slot (:mod:`toolq.workers.flow` keeps both in Redis).

A call that must wait is re-published for later (holding no worker slot meanwhile), or
ends as ``rate_limited`` in ``reject`` mode. A tool with neither limit passes without a
round trip; when Redis cannot answer, calls pass (logged) rather than stall.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from toolq import tracing
from toolq.errors import RateLimited
from toolq.workers.call.attempt import Attempt, Ended, Retry
from toolq.workers.call.ports import FlowGate
from toolq.workers.flow import LEASE_MARGIN_S, slot_poll_s
from toolq.workers.metrics import Metrics
from toolq.workers.runtime.base import failed

log = logging.getLogger("toolq.worker")


@dataclass(frozen=True)
class Slot:
    """The cluster slot a running call holds (``held`` False: its tool has no cap)."""

    key: str | None = None
    held: bool = False


@dataclass
class FlowControl:
    """The rate tokens and cluster slots of the calls this worker takes."""

    flow: FlowGate | None
    """None: no flow control at all (every call passes)."""
    metrics: Metrics
    clock: Callable[[], float]

    def enter(self, attempt: Attempt) -> Slot | Retry | Ended:
        """A rate token, then a cluster slot; or wait for them, or end (``reject``)."""
        if not attempt.profile.flow.gated or self.flow is None:
            return Slot()
        with tracing.step("toolq.flow") as span:
            entered = self._enter(attempt, self.flow)
            if span is not None:
                span.set_attribute("toolq.flow.granted", isinstance(entered, Slot))
                if isinstance(entered, Retry):
                    span.set_attribute("toolq.flow.wait_s", round(entered.delay_s, 3))
            return entered

    def _enter(self, attempt: Attempt, flow: FlowGate) -> Slot | Retry | Ended:
        try:
            token_at = self._take_token(attempt, flow)
            if not isinstance(token_at, float | None):
                return token_at
            return self._take_slot(attempt, flow, token_at)
        except Exception:
            log.warning(
                "flow control for %s unavailable; letting the call through", attempt.tool_id
            )
            return Slot()

    def leave(self, attempt: Attempt, slot: Slot) -> None:
        """Hand back the slot the call ran in (if it held one)."""
        if slot.held:
            self._release(attempt, slot.key)

    def forget(self, attempt: Attempt) -> None:
        """A cancelled call leaves its place in the slot's waiting list at once."""
        if attempt.profile.flow.max_concurrency is not None and self.flow is not None:
            self._release(attempt, attempt.profile.flow.slot_key(attempt.request.input))

    def _take_token(self, attempt: Attempt, flow: FlowGate) -> Retry | Ended | float | None:
        """The time of the call's rate token (None: the tool has no rate limit), or the
        decision to wait for the reserved one (again, if a more urgent call took its
        place) or to refuse the call."""
        request, profile = attempt.request, attempt.profile
        interval_s, tool_id = profile.flow.rate_interval_s, request.tool_id
        if interval_s is None:
            return None
        if request.rate_token_at is not None:
            moved_s = flow.confirm(tool_id, attempt.call_id)
            if moved_s <= 0:
                return request.rate_token_at
            token_at = self.clock() + moved_s
            return Retry(replace(request, rate_token_at=token_at, waits=request.waits + 1), moved_s)
        token = flow.token(
            tool_id,
            attempt.call_id,
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
            return Ended(failed(refused))
        if token.wait_s > 0:
            self.metrics.rate_limited.labels(tool_id, "queued").inc()
            token_at = self.clock() + token.wait_s
            return Retry(
                replace(request, rate_token_at=token_at, waits=request.waits + 1), token.wait_s
            )
        return self.clock()

    def _take_slot(self, attempt: Attempt, flow: FlowGate, token_at: float | None) -> Slot | Retry:
        """A cluster slot, leased for the call's hard limit + margin; or wait for one,
        keeping the rate token the call already holds."""
        request, profile = attempt.request, attempt.profile
        limit, tool_id = profile.flow.max_concurrency, request.tool_id
        if limit is None:
            return Slot()
        key = profile.flow.slot_key(request.input)
        hard_s = profile.time_limits.for_call(request.timeout_s).hard_timeout_s
        grant = flow.acquire(
            tool_id,
            key,
            attempt.call_id,
            limit=limit,
            lease_s=hard_s + LEASE_MARGIN_S,
            arrival=request.enqueued_at or attempt.received.started_at,
            priority=request.priority,
        )
        self.metrics.slots_in_use.labels(tool_id).set(grant.in_use)
        self.metrics.waiting_calls.labels(tool_id, "slot").set(grant.waiting)
        if grant.granted:
            return Slot(key, held=True)
        waiting = replace(request, rate_token_at=token_at, waits=request.waits + 1)
        return Retry(waiting, slot_poll_s(grant.rank, limit))

    def _release(self, attempt: Attempt, key: str | None) -> None:
        assert self.flow is not None
        tool_id, call_id = attempt.tool_id, attempt.call_id
        try:
            in_use = self.flow.release(tool_id, key, call_id)
        except Exception:  # the lease runs out by itself
            log.warning("cannot release %s's slot for call %s", tool_id, call_id)
            return
        self.metrics.slots_in_use.labels(tool_id).set(in_use)
