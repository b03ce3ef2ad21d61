"""Step 5, admit: the tool's circuit breaker lets the call run, or, while it is open,
defers the call until it half-opens (without spending an attempt) — or ends it when the
deadline will not allow the wait.

A breaker that cannot answer (Redis down) lets calls through (logged): it protects the
tool, it must not become a second point of failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from toolq import tracing
from toolq.envelope import ToolErrorInfo
from toolq.errors import CircuitOpen
from toolq.protocol import CallRequest
from toolq.workers.breaker import Admission
from toolq.workers.call.attempt import Attempt, Ended, Retry
from toolq.workers.call.ports import BreakerGate
from toolq.workers.metrics import Metrics
from toolq.workers.runtime.base import Outcome, failed

log = logging.getLogger("toolq.worker")

DEFER_SLACK_S = 0.05
"""A deferred call arrives just after its breaker half-opens, not just before."""


@dataclass
class Admit:
    """Asks the tool's breaker whether the call may run now."""

    breakers: BreakerGate
    metrics: Metrics
    clock: Callable[[], float]

    def __call__(self, attempt: Attempt) -> Admission | Retry | Ended:
        """The admission to run (and to report back, :mod:`.record`), or the call's
        deferral or end while its breaker is open."""
        admission = self._ask(attempt)
        return admission if admission.allowed else self._refused(attempt, admission)

    def _ask(self, attempt: Attempt) -> Admission:
        profile = attempt.profile
        if not profile.breaker.enabled:
            return Admission(True, "disabled")
        with tracing.step("toolq.breaker") as span:
            try:
                # The probe lease outlives the probe itself, so it is never handed out twice.
                admission = self.breakers.admit(profile.tool_id, profile.time_limits.backstop_s)
            except Exception:
                log.warning("breaker for %s unavailable; letting the call through", profile.tool_id)
                admission = Admission(True, "unknown")
            else:
                self.metrics.observe_breaker(profile.tool_id, admission.state)
            if span is not None:
                span.set_attribute("toolq.breaker.state", admission.state)
                span.set_attribute("toolq.breaker.allowed", admission.allowed)
        return admission

    def _refused(self, attempt: Attempt, admission: Admission) -> Retry | Ended:
        """An open breaker: wait for it (without spending an attempt) if the deadline
        allows, else end as ``circuit_open``."""
        request, policy = attempt.request, attempt.policy
        wait = admission.retry_in_s + DEFER_SLACK_S
        if policy.enabled and self.clock() + wait <= attempt.deadline:
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
            return Ended(Outcome(None, own, 0, 0), stop=why)
        refused = CircuitOpen(
            f"circuit breaker for {request.tool_id} is {admission.state}; "
            f"it lets a call through in {admission.retry_in_s:.1f}s",
            "CircuitOpen",
        )
        return Ended(failed(refused), stop=why)


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
