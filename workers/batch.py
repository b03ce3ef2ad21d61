"""Run a chunk of calls (``ToolClient.map``) delivered as one Celery message.

Celery's per-message work (delivery, acknowledgement, task events, the task's own
result) is paid once per chunk; everything toolq promises a call is still per call:
each goes through the same :class:`~toolq.workers.call.handler.CallHandler` (validation,
cancel, breaker, flow control, dead letters, metrics), its result is stored under its
own id, and a retry is a message of its own (any worker may take it).

Spreading: the chunk runs its calls on the worker's free slots — the slot its own
Celery thread would use (waited for, like a single call) and, without waiting, every
other one that is free. A slot is held across calls and given back as soon as a single
call is waiting for one, so a chunk never starves the calls around it.

Bounded: a chunk starts a call only if that call's hard limit ends before the chunk's
message could be redelivered (the visibility timeout, less Celery's margins); what is
left then goes back on the queue as a new chunk. A chunk redelivered after its worker
died skips the calls that ended or were handed on: only the calls running when the
worker died run again, as a single call would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from toolq import tracing
from toolq.envelope import ToolResult
from toolq.errors import ToolCrashed
from toolq.protocol import ChunkEntry
from toolq.workers.call.attempt import Decision, Delivery, Final, Retry
from toolq.workers.call.handler import CallHandler
from toolq.workers.results import Countdown

log = logging.getLogger("toolq.worker")


class Slots(Protocol):
    """The worker's slots (:class:`toolq.workers.runtime.routing.ByMode`)."""

    @property
    def contended(self) -> bool: ...

    def holding(self, *, wait: bool) -> AbstractContextManager[bool]: ...


class ChunkResults(Protocol):
    """Where a chunk's calls end: their stored results, and the calls handed on."""

    def store(self, call_id: str, envelope: dict[str, Any], written: Countdown) -> None:
        """Queue the call's result for writing (``written`` counts it until it is stored)."""
        ...

    def handed_off(self, chunk_id: str, call_ids: list[str]) -> None: ...

    def settled(self, chunk_id: str, call_ids: list[str]) -> set[str]:
        """Of ``call_ids``, those with a result or handed on (a redelivered chunk)."""
        ...


@dataclass(frozen=True)
class Chunk:
    """How a chunk message reached this worker."""

    chunk_id: str
    worker: str
    queue: str | None
    redelivered: bool
    entries: list[ChunkEntry]


@dataclass
class ChunkReport:
    """How a chunk's calls went: what Flower shows as the chunk task's result."""

    calls: int
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    """Handed on as single messages, to be tried again (any worker may take them)."""
    skipped: int = 0
    """Redelivered chunk: calls that had ended or been handed on before."""
    left: list[ChunkEntry] = field(default_factory=list)
    """Out of time before the redelivery timeout: sent back as a new chunk."""

    def summary(self) -> str:
        parts = [f"{self.succeeded} succeeded", f"{self.failed} failed"]
        named = (("retried", self.retried), ("skipped", self.skipped), ("put back", len(self.left)))
        parts += [f"{n} {what}" for what, n in named if n]
        return f"{self.calls} calls: " + ", ".join(parts)


@dataclass
class ChunkRunner:
    handler: CallHandler
    slots: Slots
    results: ChunkResults
    retry: Callable[[str, Retry, str | None], None]
    """Publish a call's next attempt as a single message (id, decision, queue)."""
    executor: ThreadPoolExecutor
    extra_slots: int
    """How many slots besides its own a chunk may take (the worker's slots - 1)."""
    budget_s: float
    """How long after it starts a chunk may still be running a call (see module doc)."""
    clock: Callable[[], float] = time.monotonic
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set when the worker starts its warm shutdown: a chunk then starts no more calls
    and hands the rest back to the queue, so a drain takes one hard limit at most."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _hard_limits: dict[str | None, float] = field(default_factory=dict)

    def run(self, chunk: Chunk) -> ChunkReport:
        """Run the chunk's calls; the report names those left for another message."""
        entries = chunk.entries
        report = ChunkReport(calls=len(entries))
        if chunk.redelivered:
            done = self.results.settled(chunk.chunk_id, [e.call_id for e in entries])
            if done:
                log.info(
                    "chunk %s redelivered: %d of its calls already ended", chunk.chunk_id, len(done)
                )
            entries = [e for e in entries if e.call_id not in done]
            report.skipped = len(chunk.entries) - len(entries)
        todo = deque(entries)
        if not todo:
            return report
        ends_at = self.clock() + self.budget_s
        started = [False]
        written = Countdown()
        traced = tracing.current_context()  # the chunk's span, for its calls' spans

        def next_entry() -> ChunkEntry | None:
            with self._lock:
                if not todo:
                    return None
                if started[0] and self.clock() + self._hard_limit_s(todo[0]) > ends_at:
                    return None  # the first call always runs: a chunk always progresses
                if started[0] and self.stopping.is_set():
                    return None  # the worker is draining: the rest goes back on the queue
                started[0] = True
                return todo.popleft()

        def drain(own: bool) -> None:
            with self.slots.holding(wait=own) as held:
                while held and (entry := next_entry()) is not None:
                    self._one(entry, chunk, report, written, traced)
                    if not own and self.slots.contended:
                        return

        helpers: list[Future[None]] = [
            self.executor.submit(drain, False) for _ in range(min(len(todo) - 1, self.extra_slots))
        ]
        drain(True)
        for helper in helpers:
            if not helper.cancel():  # never started: nothing to wait for
                helper.result()
        written.wait()  # acknowledged only once every result is in Redis
        report.left = list(todo)
        return report

    def _hard_limit_s(self, entry: ChunkEntry) -> float:
        tool_id = entry.message.get("tool_id") if isinstance(entry.message, Mapping) else None
        settings = self.handler.settings
        known = tool_id if isinstance(tool_id, str) and tool_id in settings.tools else None
        limit = self._hard_limits.get(known)
        if limit is None:  # configured tools and the default only: a bounded cache
            limit = self._hard_limits[known] = settings.limits_for(known).hard_timeout_s
        return limit

    def _one(
        self,
        entry: ChunkEntry,
        chunk: Chunk,
        report: ChunkReport,
        written: Countdown,
        traced: Any = None,
    ) -> None:
        if traced is None:
            self._run_one(entry, chunk, report, written)
            return
        message = entry.message if isinstance(entry.message, Mapping) else {}
        tool_id, attempt = message.get("tool_id"), message.get("attempt", 1)
        with tracing.attempt_span(
            traced,
            queue=chunk.queue,
            message_id=entry.call_id,
            tool_id=tool_id if isinstance(tool_id, str) else None,
            attempt=attempt if isinstance(attempt, int) else 1,
            chunk_id=chunk.chunk_id,
        ) as span:
            decision = self._run_one(entry, chunk, report, written)
            if isinstance(decision, Final):
                error = decision.envelope.get("error")
                kind = error.get("kind") if isinstance(error, Mapping) else None
                tracing.set_outcome(span, "failed" if error else "succeeded", kind)
            else:
                same = decision.request.attempt == attempt
                tracing.set_outcome(span, "wait" if same else "retry")

    def _run_one(
        self, entry: ChunkEntry, chunk: Chunk, report: ChunkReport, written: Countdown
    ) -> Decision:
        delivery = Delivery(entry.call_id, chunk.worker, chunk.queue, chunk.redelivered)
        try:
            decision = self.handler.handle(entry.message, delivery)
        except Exception as exc:  # the handler ends every call itself; never lose one
            log.exception("call %s of chunk %s", entry.call_id, chunk.chunk_id)
            crashed = ToolCrashed(f"worker error: {exc!r}", type(exc).__name__)
            decision = Final(ToolResult.failed(entry.call_id, "", crashed).to_dict())
        if isinstance(decision, Final):
            with self._lock:
                if decision.envelope.get("error"):
                    report.failed += 1
                else:
                    report.succeeded += 1
            self.results.store(entry.call_id, decision.envelope, written)
            return decision
        self.retry(entry.call_id, decision, chunk.queue)
        self.results.handed_off(chunk.chunk_id, [entry.call_id])
        with self._lock:
            report.retried += 1
        return decision
