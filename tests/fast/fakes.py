"""Fakes of the call handler's collaborators, for policy tests only.

Behaviour tests run the same handler with real Bun, Redis and Celery; these let the
decisions (retry, breaker, deadline, poison guard, dead letters) run in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from toolq.config.settings import Settings
from toolq.envelope import ToolErrorInfo
from toolq.workers.breaker import Admission, Verdict
from toolq.workers.handler import CallHandler
from toolq.workers.metrics import Metrics
from toolq.workers.profile import Profiles
from toolq.workers.runtime.base import Call, Outcome


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


def rig(
    outcomes: Iterable[Outcome] | Callable[[Call], Outcome] = (),
    settings: dict[str, Any] | None = None,
    breakers: FakeBreakers | None = None,
) -> Rig:
    config = Settings.model_validate({"backoff_jitter": False, **(settings or {})})
    runtime = FakeRuntime(outcomes or [ok()])
    breakers = breakers or FakeBreakers()
    dead_letters, deliveries, clock = FakeDeadLetters(), FakeDeliveries(), Clock()
    handler = CallHandler(
        settings=config,
        profiles=Profiles(config),
        runtime=runtime,
        breakers=breakers,
        dead_letters=dead_letters,
        deliveries=deliveries,
        metrics=Metrics(CollectorRegistry()),
        clock=clock,
    )
    return Rig(handler, runtime, breakers, dead_letters, deliveries, clock)
