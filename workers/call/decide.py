"""Step 8, decide: a failed attempt is tried again after the retry policy's delay
(:func:`toolq.workers.backoff.next_delay`, a pure function), or the call ends with the
reason retries stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from toolq.workers.backoff import next_delay
from toolq.workers.call.attempt import Attempt, Ended, Retry
from toolq.workers.metrics import Metrics
from toolq.workers.runtime.base import Outcome


@dataclass
class Decide:
    """Applies the call's retry policy to a failed attempt."""

    metrics: Metrics
    clock: Callable[[], float]

    def __call__(self, attempt: Attempt, outcome: Outcome, counted: bool) -> Retry | Ended:
        """``counted``: the attempt counted for the tool's breaker (:mod:`.record`)."""
        request, error = attempt.request, outcome.error
        assert error is not None, "only a failed attempt is retried"
        delay, stop = next_delay(
            attempt=request.attempt,
            error=error,
            policy=attempt.policy,
            now=self.clock(),
            deadline=attempt.deadline,
        )
        if delay is None:
            return Ended(outcome, stop=stop)
        self.metrics.retries.labels(request.tool_id, error.kind).inc()
        entry = {
            "attempt": request.attempt,
            "kind": error.kind,
            "name": error.name,
            "message": error.message,
            "delay": round(delay, 3),
            "worker": attempt.delivery.worker,
        }
        return Retry(request.next_attempt(entry, counted=counted), delay)
