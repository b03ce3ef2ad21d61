"""What passes between the steps: the message as it came, the attempt in hand once it is
decoded, and the three ways a step can settle it (end it, retry it later, or let the
next step go on).

A step that ends the call returns :class:`Ended` rather than building the envelope
itself, so only :mod:`.finish` knows what an envelope and a dead letter hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from toolq.protocol import CallRequest
from toolq.workers.backoff import RetryPolicy
from toolq.workers.cache import Cached
from toolq.workers.profile import ToolProfile
from toolq.workers.runtime.base import Outcome


@dataclass(frozen=True)
class Delivery:
    """How a message reached this worker."""

    call_id: str
    worker: str
    queue: str | None = None
    redelivered: bool = False
    """kombu restored it after its worker vanished: it may have run (or finished) before."""


@dataclass(frozen=True)
class Received:
    """A message as it reached this worker, before anything is read of it."""

    message: Any
    delivery: Delivery
    started_at: float


@dataclass(frozen=True)
class Attempt:
    """A decoded call in hand, and what its tool's profile makes of it."""

    received: Received
    request: CallRequest
    profile: ToolProfile
    policy: RetryPolicy
    """The tool's retry policy with the call's overrides (``--max-attempts``, ``--no-retry``)."""
    deadline: float
    """No retry or deferral starts after this (the policy's ``max_elapsed`` from enqueue)."""

    @property
    def delivery(self) -> Delivery:
        return self.received.delivery

    @property
    def call_id(self) -> str:
        return self.received.delivery.call_id

    @property
    def tool_id(self) -> str:
        return self.request.tool_id

    @property
    def queue_wait_s(self) -> float | None:
        """How long the call waited on the queue before this first attempt (None for a
        retry, whose wait is its own backoff)."""
        request = self.request
        if request.attempt != 1 or request.history or not request.enqueued_at:
            return None
        return max(0.0, self.received.started_at - request.enqueued_at)


@dataclass(frozen=True)
class Ended:
    """The call is over with this outcome; :mod:`.finish` makes its envelope."""

    outcome: Outcome
    stop: str | None = None
    """Why no (more) retries: the envelope's ``retry_stopped``."""
    cached: Cached | None = None
    """The stored result that answered the call."""


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
"""What the handler hands back to the task for each delivered message."""
