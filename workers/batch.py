"""Run a chunk of calls (``ToolClient.map``) delivered as one Celery message.

Celery's per-message work (delivery, acknowledgement, task events, the task's own
result) is paid once per chunk; everything toolq promises a call is still per call:
each goes through the same :class:`~toolq.workers.handler.CallHandler` (validation,
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

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import redis
from celery import Celery, states
from redis.exceptions import RedisError

from toolq.envelope import ToolResult
from toolq.errors import ToolCallFailed, ToolCrashed
from toolq.keys import Keys
from toolq.protocol import ChunkEntry
from toolq.workers.handler import CallHandler, Delivery, Final, Retry

log = logging.getLogger("toolq.worker")
WRITE_BATCH = 256
"""The most results one write sends."""
STORE_RETRY_S = 1.0
"""How often a result write is tried again while Redis is away."""


class Slots(Protocol):
    """The worker's slots (:class:`toolq.workers.runtime.routing.ByMode`)."""

    @property
    def contended(self) -> bool: ...

    def holding(self, *, wait: bool) -> AbstractContextManager[bool]: ...


class Countdown:
    """A chunk's results still being written: its message is acknowledged at zero.

    One per chunk rather than an event per result (an Event is a Condition and a lock
    each: measurable at a thousand results a second)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._left = 0

    def add(self) -> None:
        with self._cond:
            self._left += 1

    def done(self) -> None:
        with self._cond:
            self._left -= 1
            if self._left == 0:
                self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._left == 0)


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

        def next_entry() -> ChunkEntry | None:
            with self._lock:
                if not todo:
                    return None
                if started[0] and self.clock() + self._hard_limit_s(todo[0]) > ends_at:
                    return None  # the first call always runs: a chunk always progresses
                started[0] = True
                return todo.popleft()

        def drain(own: bool) -> None:
            with self.slots.holding(wait=own) as held:
                while held and (entry := next_entry()) is not None:
                    self._one(entry, chunk, report, written)
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
        self, entry: ChunkEntry, chunk: Chunk, report: ChunkReport, written: Countdown
    ) -> None:
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
            return
        self.retry(entry.call_id, decision, chunk.queue)
        self.results.handed_off(chunk.chunk_id, [entry.call_id])
        with self._lock:
            report.retried += 1


@dataclass(frozen=True)
class _Write:
    key: str
    value: str
    expires: int
    """Seconds; 0: kept for good."""
    written: Countdown


_WRITE_RESULTS = """
local n = #KEYS
for i = 1, n do
  local expires = tonumber(ARGV[n + i])
  if expires > 0 then
    redis.call('SET', KEYS[i], ARGV[i], 'EX', expires)
  else
    redis.call('SET', KEYS[i], ARGV[i])
  end
  redis.call('PUBLISH', KEYS[i], ARGV[i])
end
return n
"""
"""SET and PUBLISH each result as Celery's backend does, a batch in one command: two
commands per result through a pipeline cost the writer thread twice the packing and
reply parsing (a third of a chunk's worker time, profiled)."""


class StoredResults:
    """:class:`ChunkResults` in Celery's result backend and a Redis set per chunk.

    A result is written as Celery's Redis backend writes one — the same key, meta and
    PUBLISH, so ``ToolCall.result()``, ``gather()`` and Flower read it — but in one round
    trip and without Celery's per-result machinery (a read of the key first, retry
    wrappers, timezone lookups: a third of a chunk's Python time when profiled). The
    read first keeps a lost task from overwriting a success; a redelivered chunk skips
    ended calls instead. One writer thread writes the results waiting at the time in one
    command (a script). Like Celery's writes from a worker, a write waits out a Redis outage
    however long: a result is stored, never dropped, and its chunk is acknowledged only
    once all its results are.
    """

    def __init__(self, app: Celery, client: redis.Redis, keys: Keys, keep_s: float) -> None:
        self.app = app
        self.client = client
        self.keys = keys
        self.keep_s = max(1, int(keep_s))
        backend: Any = app.backend
        self._key_prefix = _text(backend.get_key_for_task("x"))[:-1]  # celery-task-meta-
        self._expires = _seconds(backend.expires)
        self._failure_expires = _seconds(getattr(backend, "failure_expires", None)) or self._expires
        self._pending: queue.SimpleQueue[_Write] = queue.SimpleQueue()
        self._script = client.register_script(_WRITE_RESULTS)
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    def store(self, call_id: str, envelope: dict[str, Any], written: Countdown) -> None:
        failed = bool(envelope.get("error"))
        result: Any = envelope
        if failed:
            backend: Any = self.app.backend  # per thread
            result = backend.prepare_exception(ToolCallFailed(envelope))
        meta = {
            "status": states.FAILURE if failed else states.SUCCESS,
            "result": result,
            "traceback": None,
            "children": [],
            "date_done": datetime.now(UTC).isoformat(),
            "task_id": call_id,
        }
        expires = (self._failure_expires if failed else self._expires) or 0
        written.add()
        self._pending.put(_Write(self._key_prefix + call_id, json.dumps(meta), expires, written))
        self._start_writer()

    def _start_writer(self) -> None:
        """One writer thread per process, started on first use (after a prefork fork)."""
        if self._writer is None or not self._writer.is_alive():
            with self._writer_lock:
                if self._writer is None or not self._writer.is_alive():
                    self._writer = threading.Thread(
                        target=self._write_forever, name="toolq-results", daemon=True
                    )
                    self._writer.start()

    def _write_forever(self) -> None:
        """Write whatever results are waiting in one command: calls finishing together
        share a round trip."""
        while True:
            batch = [self._pending.get()]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:  # not Redis being away (that is waited out): never hang
                log.exception("cannot store %d results", len(batch))
            for write in batch:
                write.written.done()

    def _write(self, batch: list[_Write]) -> None:
        while True:
            try:
                keys = [write.key for write in batch]
                args = [write.value for write in batch] + [write.expires for write in batch]
                self._script(keys=keys, args=args, client=self.client)
                return
            except (RedisError, OSError):
                log.warning("cannot store %d results; trying again", len(batch))
                time.sleep(STORE_RETRY_S)

    def handed_off(self, chunk_id: str, call_ids: list[str]) -> None:
        key = self.keys.chunk_handed_off(chunk_id)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.sadd(key, *call_ids)
            pipe.expire(key, self.keep_s)
            pipe.execute()

    def settled(self, chunk_id: str, call_ids: list[str]) -> set[str]:
        backend: Any = self.app.backend
        with self.client.pipeline(transaction=False) as pipe:
            pipe.smembers(self.keys.chunk_handed_off(chunk_id))
            pipe.mget([backend.get_key_for_task(call_id) for call_id in call_ids])
            handed, stored = pipe.execute()
        done = {m.decode() if isinstance(m, bytes) else str(m) for m in handed}
        for call_id, raw in zip(call_ids, stored, strict=True):
            if raw is not None and backend.decode_result(raw)["status"] in states.READY_STATES:
                done.add(call_id)
        return done


def _seconds(value: Any) -> int | None:
    """Celery's expiry setting (seconds or a timedelta) as whole seconds."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return max(1, int(value)) if value else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
