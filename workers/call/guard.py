"""Step 2, guard: a call that must not run ends before anything is spent on it — one
cancelled while it waited, or one whose attempt was redelivered :data:`MAX_DELIVERIES`
times (a call that kills its worker must not loop through every worker forever).

A redelivery short of that limit runs again, with the lost delivery in its history.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from toolq.errors import Cancelled, ToolCrashed
from toolq.protocol import CallRequest
from toolq.workers.call.attempt import Attempt, Ended
from toolq.workers.call.gate import FlowControl
from toolq.workers.call.ports import CancelRegistry, DeliveryCounter
from toolq.workers.runtime.base import failed

log = logging.getLogger("toolq.worker")

MAX_DELIVERIES = 3
"""A call redelivered this many times (its worker died running it) ends as ``crashed``."""


@dataclass
class Guard:
    """Ends a cancelled call, and one lost with its worker too often."""

    cancels: CancelRegistry | None
    deliveries: DeliveryCounter
    flow: FlowControl
    """Where a cancelled call gives up its place in a slot's waiting list."""
    clock: Callable[[], float]

    def check(self, attempt: Attempt) -> Attempt | Ended:
        """The attempt to go on with (its lost deliveries recorded), or its end."""
        if self.cancels is not None and self.cancels.is_cancelled(attempt.call_id):
            self.flow.forget(attempt)
            return Ended(failed(Cancelled("the call was cancelled before it ran", "Cancelled")))
        if not attempt.delivery.redelivered:
            return attempt
        redeliveries = self._count_redelivery(attempt)
        if redeliveries >= MAX_DELIVERIES:
            lost = ToolCrashed(
                f"this call was redelivered {MAX_DELIVERIES} times (its worker died or was "
                "stopped while running it); giving up",
                "WorkerLost",
            )
            return Ended(failed(lost), stop="max_deliveries")
        # The lost delivery goes into the attempt history (and the count of attempts).
        request = _with_redelivery(attempt.request, redeliveries, self.clock())
        return replace(attempt, request=request)

    def _count_redelivery(self, attempt: Attempt) -> int:
        """This attempt's redeliveries so far, this one included."""
        try:
            return self.deliveries.count(attempt.call_id, attempt.request.attempt)
        except Exception:  # counting is best effort: without Redis, run the call
            log.warning("cannot count deliveries of %s; running it", attempt.call_id)
            return 1


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
