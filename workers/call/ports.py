"""What the steps need of their collaborators, as Protocols.

A worker passes the Redis-backed implementations (:mod:`toolq.workers.assembly`); the
fast tier passes in-memory fakes (``tests/fast/fakes.py``), so every decision can be
tested in milliseconds without Redis.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

from toolq.workers.breaker import Admission, Verdict
from toolq.workers.cache import Cached
from toolq.workers.flow import SlotGrant, Token
from toolq.workers.runtime.base import CancelToken


class BreakerGate(Protocol):
    """Cluster-wide per-tool breakers (:class:`toolq.workers.breaker.Breakers`)."""

    def admit(self, tool_id: str, probe_lease_s: float) -> Admission: ...

    def record(self, tool_id: str, verdict: Verdict, probe: str) -> str: ...


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


class CacheStore(Protocol):
    """Stored successful results (:class:`toolq.workers.cache.ResultCache`)."""

    def get(self, digest: str) -> Cached | None: ...

    def put(self, digest: str, entry: Cached, ttl_s: float) -> None: ...


class CancelRegistry(Protocol):
    """Cancelled call ids (:class:`toolq.workers.cancel.CancelWatch`)."""

    def is_cancelled(self, call_id: str) -> bool: ...

    def running(self, call_id: str) -> AbstractContextManager[CancelToken]: ...


class DeadLetterSink(Protocol):
    """Failed calls kept for a look and a replay (:class:`toolq.workers.deadletter.DeadLetters`)."""

    def add(self, entry: dict[str, Any]) -> object: ...


class DeliveryCounter(Protocol):
    """Deliveries per attempt (:class:`toolq.workers.redelivery.Deliveries`)."""

    def count(self, call_id: str, attempt: int) -> int:
        """Count one more delivery of this attempt; return how many there were."""
        ...
