"""Every error toolq raises, in one tree.

    ToolqError
    ├── ConfigError              bad settings file, key, type or value (CLI exit 2)
    ├── BrokerUnavailable        Redis could not be reached (CLI exit 2)
    ├── QueueFull                the queue holds max_queue_length calls (CLI exit 2)
    ├── ResultTimeout            waiting for a call's result took longer than asked
    ├── ToolCallFailed           a failed call's whole envelope on its way through Celery's
    │                            result backend (state FAILURE); ToolCall.result() reads it
    └── ToolFailure              a call ended in failure; one leaf per envelope kind
        ├── ToolError            "tool_error"        the tool threw
        ├── ToolTimeout          "timeout"           soft/hard time limit reached
        ├── ToolCrashed          "crashed"           Bun exited or was killed without a result
        ├── ToolNotFound         "not_found"         no such tool in the entrypoint
        ├── InvalidInput         "invalid_input"     request refused before Bun ran
        ├── OutputTooLarge       "output_too_large"  result or stdout over its cap
        ├── InvalidOutput        "invalid_output"    result not JSON-serialisable / unreadable
        ├── MemoryExceeded       "memory_exceeded"   the tool passed runtime.max_memory_mb
        ├── CircuitOpen          "circuit_open"      the tool's breaker is open; Bun not started
        ├── RateLimited          "rate_limited"      over the tool's rate_limit (mode reject)
        └── Cancelled            "cancelled"         `toolq cancel` / ToolCall.cancel()

Each failure class knows its envelope ``kind`` and whether retrying can help by
default (``retryable``; a thrown error's own ``retryable`` property overrides it), so
callers never need an isinstance ladder. Every field goes to
``super().__init__`` because Celery rebuilds exceptions from ``.args``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ToolqError(Exception):
    """Root of every toolq error."""


class ConfigError(ToolqError):
    """Settings that cannot be used; the message names the key and where it came from."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None) -> None:
        super().__init__(message, key, source)
        self.message = message
        self.key = key
        self.source = source

    def __str__(self) -> str:
        return self.message


class BrokerUnavailable(ToolqError, ConnectionError):
    """Redis (broker or result backend) did not answer; nothing was enqueued or read."""


class QueueFull(ToolqError):
    """Backpressure: the queue has no room for what was sent (``needed`` messages: a bulk
    enqueue needs room for all its chunks at once); nothing was enqueued."""

    def __init__(self, queue: str, length: int, cap: int, needed: int = 1) -> None:
        super().__init__(queue, length, cap, needed)
        self.queue = queue
        self.length = length
        self.cap = cap
        self.needed = needed

    def __str__(self) -> str:
        if self.needed > 1:
            return (
                f"queue {self.queue!r} has no room for {self.needed} messages ({self.length} "
                f"waiting, max_queue_length {self.cap}): nothing was enqueued"
            )
        return f"queue {self.queue!r} is full ({self.length} calls, max_queue_length {self.cap})"


class ResultTimeout(ToolqError, TimeoutError):
    """The caller stopped waiting; the call itself may still finish later."""

    def __init__(self, call_id: str, waited_s: float) -> None:
        super().__init__(call_id, waited_s)
        self.call_id = call_id
        self.waited_s = waited_s

    def __str__(self) -> str:
        return f"no result for call {self.call_id} after waiting {self.waited_s:g}s"


class ToolCallFailed(ToolqError):
    """Raised by the worker's task for a call that ended in failure, so that Celery (and
    Flower) record the call as FAILURE while the result backend keeps the whole envelope
    (its only argument). Callers never see it: ``ToolCall.result()`` returns the envelope."""

    def __init__(self, envelope: dict[str, Any]) -> None:
        super().__init__(envelope)
        self.envelope = envelope

    def __str__(self) -> str:
        error = self.envelope.get("error") or {}
        return f"{error.get('kind')}: {error.get('name')}: {error.get('message')}"

    def __repr__(self) -> str:  # what Flower shows in its "exception" column
        return f"{self.envelope.get('tool_id')} failed with {self}"


class ToolFailure(ToolqError):
    """A call that ended in failure. ``kind`` is the envelope's ``error.kind``."""

    kind: ClassVar[str] = "tool_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, name: str | None = None, stack: str | None = None) -> None:
        super().__init__(message, name, stack)
        self.message = message
        self.name = name or type(self).__name__
        self.stack = stack

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class ToolError(ToolFailure):
    kind = "tool_error"
    retryable = False  # a thrown error is retried only when it says so (docs/reliability.md)


class ToolTimeout(ToolFailure):
    kind = "timeout"
    retryable = True


class ToolCrashed(ToolFailure):
    kind = "crashed"
    retryable = True


class ToolNotFound(ToolFailure):
    kind = "not_found"


class InvalidInput(ToolFailure, ValueError):
    kind = "invalid_input"


class OutputTooLarge(ToolFailure):
    kind = "output_too_large"


class InvalidOutput(ToolFailure):
    kind = "invalid_output"


class MemoryExceeded(ToolFailure):
    kind = "memory_exceeded"


class CircuitOpen(ToolFailure):
    kind = "circuit_open"


class RateLimited(ToolFailure):
    """Refused by the tool's cluster-wide rate limit; retrying at once would be refused too."""

    kind = "rate_limited"


class Cancelled(ToolFailure):
    """Someone cancelled the call: it never ran, or its Bun was stopped."""

    kind = "cancelled"


FAILURE_CLASSES: dict[str, type[ToolFailure]] = {
    cls.kind: cls
    for cls in (
        ToolError,
        ToolTimeout,
        ToolCrashed,
        ToolNotFound,
        InvalidInput,
        OutputTooLarge,
        InvalidOutput,
        MemoryExceeded,
        CircuitOpen,
        RateLimited,
        Cancelled,
    )
}
"""Envelope ``error.kind`` -> exception class, one to one."""
