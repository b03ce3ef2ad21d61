"""Every Redis key toolq owns, in one place, under the ``toolq:`` prefix.

(Celery and kombu keep their own keys: ``celery-task-meta-*``, the queue lists,
``unacked*`` and ``_kombu.*``.)
"""

from __future__ import annotations

PREFIX = "toolq:"

BREAKERS = f"{PREFIX}breakers"
"""Set of tool ids that have a breaker."""
DEAD_LETTERS = f"{PREFIX}dlq:entries"
"""Hash: call id -> JSON entry (input, env, error, history)."""
DEAD_LETTER_INDEX = f"{PREFIX}dlq:index"
"""Sorted set: call id scored by the time it failed."""
DEAD_LETTER_SIZES = f"{PREFIX}dlq:sizes"
"""Hash: call id -> bytes of its entry (for the byte budget)."""
DEAD_LETTER_BYTES = f"{PREFIX}dlq:bytes"
"""Counter: bytes of all entries together."""


def breaker(tool_id: str) -> str:
    """Hash: state, failures, successes, opened_at, probe, probe_until, trips."""
    return f"{PREFIX}breaker:{tool_id}"


def idempotency(key: str) -> str:
    """String: the call id first enqueued under this idempotency key (expires)."""
    return f"{PREFIX}idem:{key}"


def deliveries(call_id: str, attempt: int) -> str:
    """Counter: how often one attempt of a call was delivered to a worker (expires)."""
    return f"{PREFIX}deliveries:{call_id}:{attempt}"
