"""Where a worker writes calls' results: Celery's Redis backend, one round trip each.

- **Single calls** (:class:`WorkerResultBackend`, Celery's backend). Celery's
  ``store_result`` reads a result's key before it writes it, so that a task delivered
  twice (its worker lost) cannot overwrite a success with a later outcome. A toolq worker
  makes that check itself, once, where it can happen: a redelivered call first looks for
  its stored result (``workers/tasks.py``), and a chunk skips the calls that ended
  (``workers/batch.py``). So a *final* state (success, failure) is written without the
  read — one round trip instead of two for every call. Other states (a retry's RETRY)
  keep Celery's read: a quick retry may already have finished elsewhere.
- **A chunk's calls** (:class:`StoredResults`): the same key, meta and PUBLISH, written
  by one thread, a batch of finished calls in one command.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery, states
from celery.backends.redis import RedisBackend
from redis.exceptions import RedisError

from toolq.errors import ToolCallFailed
from toolq.keys import Keys

log = logging.getLogger("toolq.worker")
_PATH = f"{__name__}:WorkerResultBackend"
WRITE_BATCH = 256
"""The most results one write sends."""
STORE_RETRY_S = 1.0
"""How often a result write is tried again while Redis is away."""


class WorkerResultBackend(RedisBackend):  # type: ignore[misc]
    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if state not in states.READY_STATES:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else str(task_id)
        self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        return result


def use_worker_backend(app: Celery) -> None:
    """Make ``app`` (a worker's, before its backend is first used) store results with
    :class:`WorkerResultBackend` when its backend is plain Redis (not Sentinel)."""
    url = str(app.conf.result_backend or "")
    if url.startswith(("redis://", "rediss://", "unix://")):
        app.conf.result_backend = f"{_PATH}+{url}"


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
    """:class:`~toolq.workers.batch.ChunkResults` in Celery's result backend and a Redis
    set per chunk.

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
        keys = [write.key for write in batch]
        args = [write.value for write in batch] + [write.expires for write in batch]
        while True:
            try:
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
            pipe.mget([self._key_prefix + call_id for call_id in call_ids])
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
