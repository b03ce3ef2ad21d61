"""Step 7, record: tell the tool's breaker how the attempt went.

A call counts once for its tool's health, whatever its attempts: after its first
counted attempt the others are not reported — except a half-open probe, whose verdict
is the test of the tool's health (and whose lease must be handed back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from toolq.workers.breaker import Admission, verdict_of
from toolq.workers.call.attempt import Attempt
from toolq.workers.call.ports import BreakerGate
from toolq.workers.metrics import Metrics
from toolq.workers.runtime.base import Outcome

log = logging.getLogger("toolq.worker")


@dataclass
class Record:
    """Reports an attempt's verdict to the breaker that admitted it."""

    breakers: BreakerGate
    metrics: Metrics

    def __call__(self, attempt: Attempt, outcome: Outcome, admission: Admission) -> bool:
        """True if this attempt counted for the call (the retry carries that on)."""
        if admission.state in ("disabled", "unknown"):
            return False
        request, profile = attempt.request, attempt.profile
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
