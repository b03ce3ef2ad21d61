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
died skips the calls that finished or were handed on, so none runs twice because of it.
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

import redis
from celery import Celery, states

from toolq.envelope import ToolResult
from toolq.errors import ToolCallFailed, ToolCrashed
from toolq.keys import Keys
from toolq.protocol import ChunkEntry
from toolq.workers.handler import CallHandler, Delivery, Final, Retry

log = logging.getLogger("toolq.worker")


class Slots(Protocol):
    """The worker's slots (:class:`toolq.workers.runtime.routing.ByMode`)."""

    @property
    def contended(self) -> bool: ...

    def holding(self, *, wait: bool) -> AbstractContextManager[bool]: ...


class ChunkResults(Protocol):
    """Where a chunk's calls end: their stored results, and the calls handed on."""

    def store(self, call_id: str, envelope: dict[str, Any]) -> None: ...

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

    def run(self, chunk: Chunk) -> list[ChunkEntry]:
        """Run the chunk's calls; return those left for another message."""
        entries = chunk.entries
        if chunk.redelivered:
            done = self.results.settled(chunk.chunk_id, [e.call_id for e in entries])
            if done:
                log.info(
                    "chunk %s redelivered: %d of its calls already ended", chunk.chunk_id, len(done)
                )
            entries = [e for e in entries if e.call_id not in done]
        todo = deque(entries)
        ends_at = self.clock() + self.budget_s
        started = [False]

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
                    self._one(entry, chunk)
                    if not own and self.slots.contended:
                        return

        helpers: list[Future[None]] = [
            self.executor.submit(drain, False) for _ in range(min(len(todo) - 1, self.extra_slots))
        ]
        drain(True)
        for helper in helpers:
            if not helper.cancel():  # never started: nothing to wait for
                helper.result()
        return list(todo)

    def _hard_limit_s(self, entry: ChunkEntry) -> float:
        tool_id = entry.message.get("tool_id") if isinstance(entry.message, Mapping) else None
        known = tool_id if isinstance(tool_id, str) else None
        return self.handler.settings.limits_for(known).hard_timeout_s

    def _one(self, entry: ChunkEntry, chunk: Chunk) -> None:
        delivery = Delivery(entry.call_id, chunk.worker, chunk.queue, chunk.redelivered)
        try:
            decision = self.handler.handle(entry.message, delivery)
        except Exception as exc:  # the handler ends every call itself; never lose one
            log.exception("call %s of chunk %s", entry.call_id, chunk.chunk_id)
            crashed = ToolCrashed(f"worker error: {exc!r}", type(exc).__name__)
            decision = Final(ToolResult.failed(entry.call_id, "", crashed).to_dict())
        if isinstance(decision, Final):
            self.results.store(entry.call_id, decision.envelope)
            return
        self.retry(entry.call_id, decision, chunk.queue)
        self.results.handed_off(chunk.chunk_id, [entry.call_id])


class StoredResults:
    """:class:`ChunkResults` in Celery's result backend and a Redis set per chunk.

    A result is written as Celery's Redis backend writes one (the same key, value and
    PUBLISH, so ``ToolCall.result()`` and Flower's result lookups read it), in one round
    trip: Celery's own ``store_result`` reads the key first, to keep a lost task from
    overwriting a success — here a redelivered chunk skips ended calls instead.
    """

    def __init__(self, app: Celery, client: redis.Redis, keys: Keys, keep_s: float) -> None:
        self.app = app
        self.client = client
        self.keys = keys
        self.keep_s = max(1, int(keep_s))

    def store(self, call_id: str, envelope: dict[str, Any]) -> None:
        backend: Any = self.app.backend  # per thread
        state = states.FAILURE if envelope.get("error") else states.SUCCESS
        value: Any = ToolCallFailed(envelope) if state == states.FAILURE else envelope
        meta = backend._get_result_meta(
            result=backend.encode_result(value, state), state=state, traceback=None, request=None
        )
        meta["task_id"] = call_id
        backend._set_with_state(backend.get_key_for_task(call_id), backend.encode(meta), state)

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
