"""Fakes of the call handler's collaborators, for policy tests only.

Behaviour tests run the same handler with real Bun, Redis and Celery; these let the
decisions (retry, breaker, deadline, poison guard, dead letters) run in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from toolq.config.settings import Settings
from toolq.envelope import ToolErrorInfo
from toolq.workers.breaker import Admission, Verdict
from toolq.workers.cache import Cached
from toolq.workers.call.handler import CallHandler
from toolq.workers.flow import SlotGrant, Token, waiter_order
from toolq.workers.metrics import Metrics
from toolq.workers.profile import Profiles
from toolq.workers.runtime.base import Call, CancelToken, Outcome


def ok(result: dict[str, Any] | None = None) -> Outcome:
    return Outcome(result if result is not None else {"ok": True}, None, 1, 2)


def error(kind: str, name: str = "Error", retryable: bool | None = None) -> Outcome:
    info = ToolErrorInfo(kind, f"{kind} happened", name, retryable_hint=retryable)
    return Outcome(None, info, 1, 2)


class FakeRuntime:
    """Answers each call with the next scripted outcome (the last one repeats)."""

    def __init__(self, outcomes: Iterable[Outcome] | Callable[[Call], Outcome]) -> None:
        self._script = outcomes if callable(outcomes) else list(outcomes)
        self.calls: list[Call] = []

    def run(self, call: Call) -> Outcome:
        self.calls.append(call)
        if callable(self._script):
            return self._script(call)
        return self._script.pop(0) if len(self._script) > 1 else self._script[0]

    def close(self) -> None:
        pass


@dataclass
class FakeBreakers:
    """Admits as scripted (default: closed) and remembers every verdict."""

    admissions: list[Admission] = field(default_factory=list)
    verdicts: list[tuple[str, Verdict]] = field(default_factory=list)
    broken: bool = False

    def admit(self, tool_id: str, probe_lease_s: float) -> Admission:
        if self.broken:
            raise ConnectionError("redis is down")
        return self.admissions.pop(0) if self.admissions else Admission(True, "closed")

    def record(self, tool_id: str, verdict: Verdict, probe: str) -> str:
        self.verdicts.append((tool_id, verdict))
        return "closed"


@dataclass
class FakeDeadLetters:
    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)


@dataclass
class FakeDeliveries:
    counts: dict[tuple[str, int], int] = field(default_factory=dict)

    def count(self, call_id: str, attempt: int) -> int:
        key = (call_id, attempt)
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]


@dataclass
class FakeFlow:
    """Slots and rate tokens in memory, with the same rules as the Lua scripts (arrival
    order, reservation); ``calls`` counts every round trip a real one would make."""

    held: dict[tuple[str, str | None], set[str]] = field(default_factory=dict)
    waiting: dict[tuple[str, str | None], dict[str, float]] = field(default_factory=dict)
    token_wait: list[float] = field(default_factory=list)
    """Scripted waits for the next tokens (0 when empty)."""
    moved: list[float] = field(default_factory=list)
    """Scripted answers of the next confirms: how far a reserved token moved (0 when empty)."""
    calls: list[str] = field(default_factory=list)
    broken: bool = False
    leases: list[float] = field(default_factory=list)

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
    ) -> SlotGrant:
        self.calls.append("acquire")
        if self.broken:
            raise ConnectionError("redis is down")
        self.leases.append(lease_s)
        held = self.held.setdefault((tool_id, key), set())
        waiting = self.waiting.setdefault((tool_id, key), {})
        if holder in held:
            return SlotGrant(True, 0, len(held), len(waiting))
        waiting.setdefault(holder, waiter_order(priority, arrival))
        rank = sorted(waiting, key=lambda h: (waiting[h], h)).index(holder)
        if rank < limit - len(held):
            del waiting[holder]
            held.add(holder)
            return SlotGrant(True, 0, len(held), len(waiting))
        return SlotGrant(False, rank, len(held), len(waiting))

    def release(self, tool_id: str, key: str | None, holder: str) -> int:
        self.calls.append("release")
        held = self.held.setdefault((tool_id, key), set())
        held.discard(holder)
        self.waiting.setdefault((tool_id, key), {}).pop(holder, None)
        return len(held)

    def token(
        self,
        tool_id: str,
        holder: str,
        *,
        interval_s: float,
        reserve: bool,
        priority: int | None = None,
    ) -> Token:
        self.calls.append("token")
        if self.broken:
            raise ConnectionError("redis is down")
        wait = self.token_wait.pop(0) if self.token_wait else 0.0
        if wait > 0 and not reserve:
            return Token(False, wait, 0)
        return Token(True, wait, 1 if wait > 0 else 0)

    def confirm(self, tool_id: str, holder: str) -> float:
        self.calls.append("confirm")
        return self.moved.pop(0) if self.moved else 0.0


@dataclass
class FakeCancels:
    cancelled: set[str] = field(default_factory=set)
    tokens: dict[str, CancelToken] = field(default_factory=dict)

    def is_cancelled(self, call_id: str) -> bool:
        return call_id in self.cancelled

    @contextmanager
    def running(self, call_id: str) -> Iterator[CancelToken]:
        token = CancelToken()
        self.tokens[call_id] = token
        if call_id in self.cancelled:
            token.cancel()
        try:
            yield token
        finally:
            token.close()


@dataclass
class FakeCache:
    entries: dict[str, Cached] = field(default_factory=dict)
    ttls: list[float] = field(default_factory=list)

    def get(self, digest: str) -> Cached | None:
        return self.entries.get(digest)

    def put(self, digest: str, entry: Cached, ttl_s: float) -> None:
        self.entries[digest] = entry
        self.ttls.append(ttl_s)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    """A handler wired to fakes, and the fakes to look at afterwards."""

    handler: CallHandler
    runtime: FakeRuntime
    breakers: FakeBreakers
    dead_letters: FakeDeadLetters
    deliveries: FakeDeliveries
    clock: Clock
    flow: FakeFlow
    cancels: FakeCancels
    cache: FakeCache


def rig(
    outcomes: Iterable[Outcome] | Callable[[Call], Outcome] = (),
    settings: dict[str, Any] | None = None,
    breakers: FakeBreakers | None = None,
    flow: FakeFlow | None = None,
) -> Rig:
    config = Settings.model_validate({"backoff_jitter": False, **(settings or {})})
    runtime = FakeRuntime(outcomes or [ok()])
    breakers = breakers or FakeBreakers()
    dead_letters, deliveries, clock = FakeDeadLetters(), FakeDeliveries(), Clock()
    flow = flow or FakeFlow()
    cancels, cache = FakeCancels(), FakeCache()
    handler = CallHandler(
        settings=config,
        profiles=Profiles(config),
        runtime=runtime,
        breakers=breakers,
        dead_letters=dead_letters,
        deliveries=deliveries,
        metrics=Metrics(CollectorRegistry()),
        clock=clock,
        flow=flow,
        cancels=cancels,
        cache=cache,
    )
    return Rig(handler, runtime, breakers, dead_letters, deliveries, clock, flow, cancels, cache)
