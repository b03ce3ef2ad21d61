"""The producer API for application code: enqueue tool calls, wait for their results.

    from toolq import ToolClient

    client = ToolClient()                      # settings from compozy.yaml / TOOLQ_*
    call = client.enqueue("weather", {"city": "Lisbon"})
    print(call.result(timeout=30).result)
    client.run("weather", {"city": "Oslo"})    # enqueue and wait
    client.map("weather", [{"city": c} for c in cities])   # in chunks: see enqueue_many

Bad calls (an invalid tool id or env, input that is not JSON or is too big) raise
:class:`~toolq.errors.InvalidInput` here, before anything is enqueued.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis
from celery import Celery
from celery.result import AsyncResult
from redis.exceptions import RedisError

from toolq.config.celery_app import make_celery, queue_lists
from toolq.config.connections import close_redis, redis_client
from toolq.config.settings import Settings
from toolq.envelope import ToolResult
from toolq.errors import BrokerUnavailable, ResultTimeout
from toolq.presence import QueueWatch, unserved_warning
from toolq.producers import idempotency
from toolq.producers.base import (
    QUEUE_FULL_POLL_S,
    REFUSED_RETRY_S,
    BaseClient,
    Duration,
    has_room,
    prepare_request,
    redis_errors,
    seconds,
    to_result,
)
from toolq.producers.call import ToolCall
from toolq.producers.cancel import CancelOutcome, cancel_call
from toolq.producers.collect import collect
from toolq.protocol import CallRequest

log = logging.getLogger("toolq.producer")
T = TypeVar("T")


def _subscribe_on_wait(app: Celery) -> None:
    """Subscribe to a call's result when someone waits for it, not at enqueue.

    Celery's Redis backend subscribes at ``send_task``; ``result()`` subscribes anyway
    and then reads the stored state, so nothing is missed. Without it an enqueue opens
    one connection, not two — a hung Redis costs it one socket timeout — and a
    fire-and-forget call holds no subscription. (``app.backend`` is per thread.)
    """
    backend: Any = app.backend
    if not getattr(backend, "_toolq_subscribe_on_wait", False):
        backend.on_task_call = lambda *args, **kwargs: None
        backend._toolq_subscribe_on_wait = True


class ToolClient(BaseClient):
    """Enqueues tool calls to Redis for toolq workers; one per application is enough."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: str | None = None,
        profile: str | None = None,
        redis_url: str | None = None,
    ) -> None:
        super().__init__(settings, config=config, profile=profile, redis_url=redis_url)
        self.app = make_celery(self.settings, name="toolq-producer")
        self._redis_client: redis.Redis | None = None
        self._watch = QueueWatch(lambda: self._redis)

    def enqueue(
        self,
        tool_id: str,
        input: Any = None,
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        max_attempts: int | None = None,
        retry: bool = True,
        idempotency_key: str | None = None,
        sealed_env: str | None = None,
        priority: int | None = None,
        cache: bool = True,
        block: Duration | None = None,
    ) -> ToolCall:
        """Put one call on the queue and return at once.

        ``priority`` 0 (default) .. 9: a worker takes more urgent calls of its queues
        first. ``cache=False`` runs the tool even if its result cache has an answer.
        A queue at its ``max_queue_length`` raises :class:`QueueFull`, or with ``block``
        waits up to that long for room first.

        ``config`` overrides the tool's configured ``config`` (its second argument) key
        by key. Input that breaks the tool's input schema raises :class:`InvalidInput`
        here, naming the field. ``max_attempts`` and ``retry=False`` override the retry
        policy for this call.
        With ``idempotency_key``, enqueueing again under the same key within
        ``idempotency_ttl`` returns the first call (and so its result) instead of
        running the tool twice. ``sealed_env``: an env already sealed (a dead letter's),
        passed on unopened for the worker to open.
        """
        request = prepare_request(
            self.settings,
            tool_id,
            input,
            env,
            timeout,
            config=config,
            max_attempts=max_attempts,
            retry=retry,
            priority=priority,
            cache=cache,
            sealed_env=sealed_env,
        )
        call_id = str(uuid.uuid4())
        queue = self._queue(tool_id, queue)
        self._make_room(queue, block)
        if idempotency_key is not None:
            first = self._claim(idempotency_key, call_id, request)
            if first is not None:
                return self.call(first, tool_id)
        try:
            async_result = self._send(request, call_id, queue)
        except BrokerUnavailable:
            if idempotency_key is not None:  # do not leave the key pointing at nothing
                with contextlib.suppress(RedisError):
                    self._redis.delete(self.settings.keys.idempotency(idempotency_key))
            raise
        return ToolCall(call_id, tool_id, async_result, self.settings.redis_url, self)

    def _queue(self, tool_id: str, queue: str | None) -> str:
        """The queue a call goes to (:meth:`BaseClient._chosen_queue`); a warning when a
        look finds no live worker on it."""
        queue = self._chosen_queue(tool_id, queue)
        if self._watch.newly_unserved(queue):  # one ZCOUNT per queue per few seconds
            log.warning("%s", unserved_warning(self.settings, queue))
        return queue

    def queue_length(self, queue: str) -> int:
        """Calls waiting in ``queue`` (all priorities; not those a worker holds)."""
        with redis_errors(self.settings.redis_url), self._redis.pipeline() as pipe:
            for name in queue_lists(queue):
                pipe.llen(name)
            return sum(int(n) for n in pipe.execute())

    def _make_room(self, queue: str, block: Duration | None, needed: int = 1) -> None:
        """Backpressure: one look at the queue's length when it has a cap (none otherwise),
        for room for ``needed`` messages at once (:func:`~toolq.producers.base.has_room`)."""
        room = self._room(queue, block)
        if room is None:
            return
        cap, deadline = room
        while not has_room(queue, self.queue_length(queue), needed, cap, deadline):
            time.sleep(QUEUE_FULL_POLL_S)

    def cancel(self, call_id: str, tool_id: str = "") -> CancelOutcome:
        """Cancel a call by id (see :meth:`ToolCall.cancel`)."""
        with redis_errors(self.settings.redis_url):
            return cancel_call(self._redis, self.app, self.settings.keys, call_id, tool_id)

    def _send(self, request: CallRequest, call_id: str, queue: str) -> AsyncResult:
        _subscribe_on_wait(self.app)
        return self._publish(self._call_send(request, call_id, queue))

    def _publish(self, send: Callable[[], T]) -> T:
        """Publish once per try, within ``redis_socket_timeout`` in all: a refused
        connection (a restart) is tried again until then; a hung Redis is not waited
        for twice (Celery's own publish retries would wait 4-5 socket timeouts)."""
        deadline = time.monotonic() + self.settings.redis_socket_timeout_s
        while True:
            try:
                with redis_errors(self.settings.redis_url):
                    return send()
            except BrokerUnavailable:
                if time.monotonic() + REFUSED_RETRY_S >= deadline:
                    raise
                time.sleep(REFUSED_RETRY_S)

    def run(
        self,
        tool_id: str,
        input: Any = None,
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        wait: Duration | None = None,
        max_attempts: int | None = None,
        retry: bool = True,
        idempotency_key: str | None = None,
        priority: int | None = None,
        cache: bool = True,
        block: Duration | None = None,
    ) -> ToolResult:
        """Enqueue and wait. ``timeout`` limits the tool; ``wait`` limits the waiting."""
        call = self.enqueue(
            tool_id,
            input,
            env,
            timeout,
            queue,
            config=config,
            max_attempts=max_attempts,
            retry=retry,
            idempotency_key=idempotency_key,
            priority=priority,
            cache=cache,
            block=block,
        )
        return call.result(timeout=wait)

    def enqueue_many(
        self,
        tool_id: str,
        inputs: Iterable[Any],
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        max_attempts: int | None = None,
        retry: bool = True,
        priority: int | None = None,
        cache: bool = True,
        block: Duration | None = None,
        chunk_size: int | None = None,
    ) -> list[ToolCall]:
        """Enqueue one call per input, ``chunk_size`` calls per message; return at once.

        Every call keeps its own id, result, retries, breaker accounting and dead letter;
        a chunk is one message to Celery (and Flower), run over a worker's free slots.
        ``chunk_size`` 1 sends each call alone; by default a chunk holds up to
        :data:`~toolq.producers.chunks.MAX_AUTO_CHUNK` calls, smaller for short lists so
        that at least :data:`~toolq.producers.chunks.MIN_CHUNKS` messages spread over the
        workers. Every input is validated before anything is sent (:class:`InvalidInput`
        names the first bad one). A chunk counts as one message towards
        ``max_queue_length``; on a capped queue all chunks are sent or none:
        :class:`QueueFull` (after ``block``) means nothing was enqueued, also when the
        chunks outnumber the cap. If Redis goes away part-way, :class:`BrokerUnavailable`
        is raised and the chunks already sent still run.
        """
        plan = self._plan(
            tool_id,
            inputs,
            env,
            timeout,
            config=config,
            max_attempts=max_attempts,
            retry=retry,
            priority=priority,
            cache=cache,
            chunk_size=chunk_size,
        )
        queue = self._queue(tool_id, queue)
        self._make_room(queue, block, len(plan.chunks))  # all or nothing: room for every chunk
        _subscribe_on_wait(self.app)
        for send in self._chunk_sends(plan, queue):
            self._publish(send)
        return [self.call(call_id, tool_id) for call_id in plan.requests]

    def gather(self, calls: Sequence[ToolCall], wait: Duration | None = None) -> list[ToolResult]:
        """Wait for every call (in one subscription, not one per call); results in the
        calls' order. :class:`ResultTimeout` names the first call not done by ``wait``."""
        wait_s = None if wait is None else seconds(wait, "wait")
        deadline = None if wait_s is None else time.monotonic() + wait_s
        ids = [call.id for call in calls]
        with redis_errors(self.settings.redis_url):
            values = collect(self.app, self._redis, ids, deadline)
        missing = [call for call in calls if call.id not in values]
        if missing:
            raise ResultTimeout(missing[0].id, wait_s or 0.0)
        return [to_result(values[call.id], call.id, call.tool_id) for call in calls]

    def map(
        self,
        tool_id: str,
        inputs: Iterable[Any],
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        wait: Duration | None = None,
        max_attempts: int | None = None,
        retry: bool = True,
        priority: int | None = None,
        cache: bool = True,
        block: Duration | None = None,
        chunk_size: int | None = None,
    ) -> list[ToolResult]:
        """Run one call per input, in chunks across workers; results in input order
        (:meth:`enqueue_many`, then :meth:`gather`)."""
        calls = self.enqueue_many(
            tool_id,
            inputs,
            env,
            timeout,
            queue,
            config=config,
            max_attempts=max_attempts,
            retry=retry,
            priority=priority,
            cache=cache,
            block=block,
            chunk_size=chunk_size,
        )
        return self.gather(calls, wait)

    def call(self, call_id: str, tool_id: str = "") -> ToolCall:
        """A handle on a call enqueued earlier (by id)."""
        return ToolCall(
            call_id, tool_id, AsyncResult(call_id, app=self.app), self.settings.redis_url, self
        )

    def close(self) -> None:
        self.app.close()
        if self._redis_client is not None:
            close_redis(self._redis_client)

    @property
    def _redis(self) -> redis.Redis:
        if self._redis_client is None:
            self._redis_client = redis_client(self.settings)
        return self._redis_client

    def _claim(self, idempotency_key: str, call_id: str, request: CallRequest) -> str | None:
        """Reserve the key for ``call_id``; return the earlier call's id if there is one
        for the same request (:mod:`toolq.producers.idempotency`; another is refused)."""
        key, ttl = self._idempotency(idempotency_key)
        with redis_errors(self.settings.redis_url):
            return idempotency.claim(self._redis, key, idempotency_key, call_id, request, ttl)

    def __enter__(self) -> ToolClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
