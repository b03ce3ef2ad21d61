"""The asyncio producer: :class:`AsyncToolClient`, ``ToolClient``'s surface for async apps.

    from toolq import AsyncToolClient

    async with AsyncToolClient() as client:          # one per event loop is enough
        result = await client.run("weather", {"city": "Lisbon"}, wait=30)
        call = await client.enqueue("weather", {"city": "Oslo"})
        async for result in client.as_completed(await client.enqueue_many("weather", inputs)):
            ...

**One message contract.** A call is validated, chunked and built by the code
``ToolClient`` uses (:class:`~toolq.producers.base.BaseClient`), and its Celery message
by the same ``send_call``/``send_chunk`` (signing included), run on a Celery app that
records the message instead of sending it (:mod:`toolq.producers.wire`); the entry is
then pushed with ``redis.asyncio``. Nothing runs in a thread.

**Results.** Every waiter of a client shares one pub/sub connection
(:class:`~toolq.producers.hub.ResultHub`), which rides out a Redis restart without
losing a result. The client holds at most three Redis connections whatever the number
of awaiting tasks: two for commands and one for pub/sub
(:mod:`toolq.producers.aio_connections`).

**Cancellation.** Cancelling a task that awaits a result (a client that disconnects
from a FastAPI endpoint) stops the waiting, not the call: it still runs and stores its
result. ``cancel_on_exit=True`` cancels the call too when the wait ends without its
result (the awaiting task cancelled, or ``timeout`` passed); ``await call.cancel()``
cancels it explicitly.

Over 400 lines on purpose: one class whose methods mirror ``ToolClient``'s one for one;
what they share is in base.py, the result hub and the connections in modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar

import redis.asyncio as aioredis

from toolq.config.celery_app import queue_lists
from toolq.config.settings import Settings
from toolq.envelope import ToolResult
from toolq.errors import BrokerUnavailable
from toolq.presence import CHECK_EVERY_S, live_workers_async, unserved_warning
from toolq.producers import idempotency
from toolq.producers.aio_connections import LoopConnections
from toolq.producers.base import (
    QUEUE_FULL_POLL_S,
    REFUSED_RETRY_S,
    BaseClient,
    Duration,
    has_room,
    prepare_request,
    seconds,
    to_result,
)
from toolq.producers.call import AsyncToolCall
from toolq.producers.cancel import CancelOutcome, cancel_call_async
from toolq.producers.collect import decode_stored, text
from toolq.producers.wire import capture_app, entries_of
from toolq.protocol import CallRequest

log = logging.getLogger("toolq.producer")
T = TypeVar("T")


class AsyncToolClient(BaseClient):
    """Enqueues tool calls and awaits their results from asyncio code.

    The same surface as :class:`toolq.ToolClient`, every method that talks to Redis a
    coroutine. Bound to the event loop it is first used in; make one per loop (an
    app's lifespan) and close it (``await client.close()`` or ``async with``).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: str | None = None,
        profile: str | None = None,
        redis_url: str | None = None,
    ) -> None:
        super().__init__(settings, config=config, profile=profile, redis_url=redis_url)
        self.app = capture_app(self.settings)  # builds messages, never connects
        self._backend: Any = self.app.backend
        self._connections = LoopConnections(
            self.settings, lambda raw: decode_stored(self._backend, raw)
        )
        self._queue_looks: dict[str, tuple[float, bool]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # -- connections ---------------------------------------------------------------

    async def _command(self, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one command (or pipeline): :meth:`LoopConnections.command`."""
        return await self._connections.command(command)

    async def _get(self, key: str) -> Any:
        return await self._command(lambda r: r.get(key))

    def _result_key(self, call_id: str) -> str:
        return text(self._backend.get_key_for_task(call_id))

    # -- enqueue -------------------------------------------------------------------

    async def enqueue(
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
    ) -> AsyncToolCall:
        """Put one call on the queue and return (see :meth:`toolq.ToolClient.enqueue`:
        the same options, checks and errors)."""
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
        queue = await self._queue(tool_id, queue)
        await self._make_room(queue, block)
        if idempotency_key is not None:
            first = await self._claim(idempotency_key, call_id, request)
            if first is not None:
                return self.call(first, tool_id)
        try:
            await self._push(self._call_entries(request, call_id, queue))
        except BrokerUnavailable:
            if idempotency_key is not None:  # do not leave the key pointing at nothing
                key = self.settings.keys.idempotency(idempotency_key)
                with contextlib.suppress(BrokerUnavailable):
                    await self._command(lambda r: r.delete(key))
            raise
        return AsyncToolCall(call_id, tool_id, self)

    def _call_entries(
        self, request: CallRequest, call_id: str, queue: str
    ) -> list[tuple[str, str]]:
        """The Redis entry ``ToolClient`` would push for this call (same code path)."""
        return entries_of(self._call_send(request, call_id, queue))

    async def _push(self, entries: list[tuple[str, str]]) -> None:
        """LPUSH the entries (one round trip), as kombu's Redis transport does. A refused
        connection (a restart) is tried again within ``redis_socket_timeout``."""

        async def push(r: aioredis.Redis) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                for name, entry in entries:
                    pipe.lpush(name, entry)
                return await pipe.execute()

        deadline = time.monotonic() + self.settings.redis_socket_timeout_s
        while True:
            try:
                await self._command(push)
                return
            except BrokerUnavailable:
                if time.monotonic() + REFUSED_RETRY_S >= deadline:
                    raise
                await asyncio.sleep(REFUSED_RETRY_S)

    async def _queue(self, tool_id: str, queue: str | None) -> str:
        """The queue a call goes to; warnings as ``ToolClient`` gives them (a queue no
        configured worker reads; no live worker, looked at most every few seconds)."""
        queue = self._chosen_queue(tool_id, queue)
        now = time.monotonic()
        previous = self._queue_looks.get(queue)
        if previous is None or now - previous[0] >= CHECK_EVERY_S:
            self._queue_looks[queue] = (now, previous[1] if previous else True)
            try:
                served = await self._command(lambda r: live_workers_async(r, queue)) > 0
            except BrokerUnavailable:
                served = True  # unknown counts as served: this only ever warns
            self._queue_looks[queue] = (now, served)
            if not served and (previous is None or previous[1]):
                log.warning("%s", unserved_warning(self.settings, queue))
        return queue

    async def queue_length(self, queue: str) -> int:
        """Calls waiting in ``queue`` (all priorities; not those a worker holds)."""

        async def count(r: aioredis.Redis) -> int:
            async with r.pipeline(transaction=False) as pipe:
                for name in queue_lists(queue):
                    pipe.llen(name)
                return sum(int(n) for n in await pipe.execute())

        return await self._command(count)

    async def _make_room(self, queue: str, block: Duration | None, needed: int = 1) -> None:
        """Backpressure, as ``ToolClient``'s: room for ``needed`` messages at once, or
        :class:`QueueFull` (after waiting up to ``block``)."""
        room = self._room(queue, block)
        if room is None:
            return
        cap, deadline = room
        while not has_room(queue, await self.queue_length(queue), needed, cap, deadline):
            await asyncio.sleep(QUEUE_FULL_POLL_S)

    async def _claim(self, idempotency_key: str, call_id: str, request: CallRequest) -> str | None:
        key, ttl = self._idempotency(idempotency_key)
        record = idempotency.record(idempotency_key, call_id, request)
        if await self._command(lambda r: r.set(key, record, nx=True, ex=ttl)):
            return None
        return idempotency.judge(await self._get(key), idempotency_key, request)

    async def enqueue_many(
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
    ) -> list[AsyncToolCall]:
        """One call per input, in chunk messages (see :meth:`toolq.ToolClient.enqueue_many`);
        every input is validated before anything is sent, and every chunk is pushed in one
        round trip."""
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
        queue = await self._queue(tool_id, queue)
        await self._make_room(queue, block, len(plan.chunks))
        await self._push(
            [entry for send in self._chunk_sends(plan, queue) for entry in entries_of(send)]
        )
        return [AsyncToolCall(call_id, tool_id, self) for call_id in plan.requests]

    # -- results -------------------------------------------------------------------

    async def _wait(self, calls: Sequence[AsyncToolCall], wait_s: float | None) -> dict[str, Any]:
        """Every call's result value by id, or :class:`ResultTimeout` (the first call not
        done) after ``wait_s``; :class:`BrokerUnavailable` if Redis was away then."""
        async with contextlib.aclosing(self._completed(calls, wait_s)) as completed:
            return {call_id: value async for call_id, value in completed}

    def _completed(
        self, calls: Sequence[AsyncToolCall], wait_s: float | None
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """``(call id, value)`` as each result arrives (:meth:`ResultHub.completed`)."""
        hub = self._connections.bind()
        return hub.completed({self._result_key(call.id): call.id for call in calls}, wait_s)

    async def gather(
        self, calls: Sequence[AsyncToolCall], wait: Duration | None = None
    ) -> list[ToolResult]:
        """Wait for every call; results in the calls' order. :class:`ResultTimeout` names
        the first call not done by ``wait``."""
        wait_s = None if wait is None else seconds(wait, "wait")
        values = await self._wait(calls, wait_s)
        return [to_result(values[call.id], call.id, call.tool_id) for call in calls]

    async def as_completed(
        self, calls: Sequence[AsyncToolCall], wait: Duration | None = None
    ) -> AsyncIterator[ToolResult]:
        """Each call's result as it arrives (``async for``); :class:`ResultTimeout` names
        a call not done by ``wait`` (the results before it were yielded)."""
        wait_s = None if wait is None else seconds(wait, "wait")
        tool_ids = {call.id: call.tool_id for call in calls}
        async with contextlib.aclosing(self._completed(calls, wait_s)) as completed:
            async for call_id, value in completed:
                yield to_result(value, call_id, tool_ids[call_id])

    async def run(
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
        cancel_on_exit: bool = False,
    ) -> ToolResult:
        """Enqueue and wait. ``timeout`` limits the tool; ``wait`` limits the waiting.
        Cancelling the awaiting task leaves the call running unless ``cancel_on_exit``."""
        call = await self.enqueue(
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
        return await call.result(timeout=wait, cancel_on_exit=cancel_on_exit)

    async def map(
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
        """Run one call per input, in chunks across workers; results in input order."""
        calls = await self.enqueue_many(
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
        return await self.gather(calls, wait)

    def call(self, call_id: str, tool_id: str = "") -> AsyncToolCall:
        """A handle on a call enqueued earlier (by id)."""
        return AsyncToolCall(call_id, tool_id, self)

    # -- cancel --------------------------------------------------------------------

    async def cancel(self, call_id: str, tool_id: str = "") -> CancelOutcome:
        """Cancel a call by id: the same three writes as ``ToolClient.cancel``."""
        return await cancel_call_async(
            self._command, self.app, self.settings.keys, call_id, tool_id
        )

    async def _cancel_anyway(self, call_id: str, tool_id: str) -> None:
        """Cancel for a waiter that is leaving (its task may be cancelled): shielded, so
        the cancel completes even if the waiter is cancelled again meanwhile."""
        task = asyncio.ensure_future(self.cancel(call_id, tool_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            await asyncio.shield(task)
        except BrokerUnavailable as exc:
            log.warning("could not cancel call %s on leaving: %s", call_id, exc)

    # -- lifecycle -----------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Results awaited right now (distinct calls)."""
        hub = self._connections.hub
        return 0 if hub is None else hub.waiting

    async def close(self) -> None:
        """Stop every wait and close the client's connections."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._connections.close()
        self.app.close()

    async def __aenter__(self) -> AsyncToolClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
