"""The asyncio producer: :class:`AsyncToolClient`, ``ToolClient``'s surface for async apps.

    from toolq import AsyncToolClient

    async with AsyncToolClient() as client:          # one per event loop is enough
        result = await client.run("weather", {"city": "Lisbon"}, wait=30)
        call = await client.enqueue("weather", {"city": "Oslo"})
        async for result in client.as_completed(await client.enqueue_many("weather", inputs)):
            ...

**One message contract.** A call is validated and built by the functions
``ToolClient`` uses (:func:`~toolq.producers.base.prepare_request`,
:func:`~toolq.producers.chunks.plan_chunks`), and its Celery message by the same
``send_call``/``send_chunk`` (signing included), run on a Celery app that records the
message instead of sending it (:mod:`toolq.producers.wire`); the entry is then pushed
with ``redis.asyncio``. Nothing runs in a thread.

**Results.** Every waiter of a client shares one pub/sub connection (:class:`_Hub`):
it subscribes to a call's result channel, and once Redis confirms the subscription it
reads the stored result (one ``MGET`` for every key subscribed together), so a result
published before the subscription is not missed. If the connection drops (a Redis
restart), the hub reconnects every half second, subscribes again to every awaited key
and reads them all again: a result stored meanwhile is found; nothing is lost. The
client holds at most three Redis connections whatever the number of awaiting tasks:
two for commands and one for pub/sub.

**Cancellation.** Cancelling a task that awaits a result (a client that disconnects
from a FastAPI endpoint) stops the waiting, not the call: it still runs and stores its
result. ``cancel_on_exit=True`` cancels the call too when the wait ends without its
result (the awaiting task cancelled, or ``timeout`` passed); ``await call.cancel()``
cancels it explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from celery import Celery, states
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from toolq.config.celery_app import queue_lists, send_call, send_chunk
from toolq.config.connections import parse_sentinel_url
from toolq.config.loader import load_settings
from toolq.config.settings import Settings, redact_url
from toolq.envelope import ToolResult
from toolq.errors import BrokerUnavailable, QueueFull, ResultTimeout
from toolq.presence import CHECK_EVERY_S, live_workers_async, unserved_warning
from toolq.producers import idempotency
from toolq.producers.base import (
    QUEUE_FULL_POLL_S,
    Duration,
    prepare_request,
    seconds,
    to_result,
)
from toolq.producers.cancel import (
    CancelOutcome,
    cancelled_failure,
    mark_cancelled,
    stored_failure,
)
from toolq.producers.chunks import plan_chunks
from toolq.producers.collect import PART, decode_stored
from toolq.producers.wire import capture_app, entries_of
from toolq.protocol import CallRequest
from toolq.sealing import load_sealer
from toolq.signing import load_signer
from toolq.validation import validate_call_id

log = logging.getLogger("toolq.producer")
T = TypeVar("T")

COMMAND_CONNECTIONS = 2
"""Redis connections a client uses for commands at most (its pub/sub one is a third)."""
OUTAGE_POLL_S = 0.5
"""How often the result hub tries Redis again while it is away."""
RECHECK_S = 5.0
"""How often the hub reads every awaited result again beside the published ones: a
message lost on a connection that died silently is found within this."""
READ_POLL_S = 1.0
_REFUSED_RETRY_S = 0.2


def async_redis_client(settings: Settings, *, retries: int = 1) -> aioredis.Redis:
    """A ``redis.asyncio`` client with the sync client's timeouts (and Sentinel). A broken
    pooled connection (Redis restarted) is tried again ``retries`` times at once; longer
    outages are the caller's to ride out (it knows its deadline)."""
    timeout = settings.redis_socket_timeout_s
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": AsyncRetry(NoBackoff(), retries=retries),
        "retry_on_error": [redis.ConnectionError],
    }
    if settings.redis_url.startswith("sentinel://"):
        assert settings.redis_sentinel_master is not None  # checked by Settings
        sentinels, db, password = parse_sentinel_url(settings.redis_url)
        sentinel: Any = AsyncSentinel(
            sentinels, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        master: aioredis.Redis = sentinel.master_for(
            settings.redis_sentinel_master, db=db, password=password, **options
        )
        return master
    return aioredis.Redis.from_url(settings.redis_url, **options)


def _unavailable(url: str, exc: BaseException) -> BrokerUnavailable:
    return BrokerUnavailable(f"cannot reach Redis at {redact_url(url)}: {exc}")


class AsyncToolCall:
    """A handle on an enqueued call (asyncio). ``id`` is stable; ``await result()``."""

    def __init__(self, call_id: str, tool_id: str, client: AsyncToolClient) -> None:
        self.id = call_id
        self.tool_id = tool_id
        self._client = client

    def __repr__(self) -> str:
        return f"AsyncToolCall(id={self.id!r}, tool_id={self.tool_id!r})"

    async def result(
        self, timeout: Duration | None = None, *, cancel_on_exit: bool = False
    ) -> ToolResult:
        """Wait for the call to finish; :class:`ResultTimeout` after ``timeout`` (a Redis
        outage longer than it: :class:`BrokerUnavailable`). Cancelling the awaiting task
        leaves the call running unless ``cancel_on_exit`` (then it is cancelled when the
        wait ends without a result: task cancelled or timeout)."""
        wait_s = None if timeout is None else seconds(timeout, "timeout")
        try:
            values = await self._client._wait([self], wait_s)
        except (asyncio.CancelledError, ResultTimeout, BrokerUnavailable):
            if cancel_on_exit:
                await self._client._cancel_anyway(self.id, self.tool_id)
            raise
        return to_result(values[self.id], self.id, self.tool_id)

    async def cancel(self) -> CancelOutcome:
        """Cancel the call (see :meth:`toolq.ToolCall.cancel`)."""
        return await self._client.cancel(self.id, self.tool_id)

    async def state(self) -> str:
        """Celery's view: PENDING (queued or unknown), SUCCESS or FAILURE."""
        raw = await self._client._get(self._client._result_key(self.id))
        if raw is None:
            return str(states.PENDING)
        meta = json.loads(raw)
        return str(meta.get("status", states.PENDING)) if isinstance(meta, dict) else "PENDING"

    async def ready(self) -> bool:
        raw = await self._client._get(self._client._result_key(self.id))
        return raw is not None and bool(decode_stored(self._client._backend, raw)[0])

    async def forget(self) -> None:
        """Drop the stored result from Redis."""
        key = self._client._result_key(self.id)
        await self._client._command(lambda r: r.delete(key))


class _Hub:
    """One pub/sub connection that every waiter of a client shares (see the module).

    Waiters register futures by result key; a syncer task subscribes new keys (in
    batches), waits for Redis to confirm, then reads their stored values; a reader task
    delivers published results. On a connection loss both start over on a new
    connection, for every key still awaited.
    """

    def __init__(
        self,
        make_pubsub: Callable[[], PubSub],
        read_stored: Callable[[list[str]], Awaitable[list[Any]]],
        decode: Callable[[Any], tuple[bool, Any]],
    ) -> None:
        self._make_pubsub = make_pubsub
        self._read_stored = read_stored
        self._decode = decode
        self._waiters: dict[str, set[asyncio.Future[Any]]] = {}
        self._subscribed: set[str] = set()
        self._confirming: dict[str, asyncio.Future[None]] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self.lost: BaseException | None = None
        """The error of the last attempt to reach Redis, None while it answers."""

    def watch(self, keys: Iterable[str]) -> dict[str, asyncio.Future[Any]]:
        """A future per key, fulfilled with the decoded result value when it is stored."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[Any]] = {}
        for key in keys:
            if key in futures:
                continue
            future: asyncio.Future[Any] = loop.create_future()
            self._waiters.setdefault(key, set()).add(future)
            futures[key] = future
        if self._syncer is None or self._syncer.done():
            self._syncer = loop.create_task(self._sync(), name="toolq-result-hub")
        self._wake.set()
        return futures

    def unwatch(self, futures: Mapping[str, asyncio.Future[Any]]) -> None:
        """Stop waiting (the keys are unsubscribed soon after if nobody else waits)."""
        for key, future in futures.items():
            future.cancel()
            waiting = self._waiters.get(key)
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self._waiters[key]
        self._wake.set()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _deliver(self, key: str, raw: Any) -> None:
        waiting = self._waiters.get(key)
        if not waiting or raw is None:
            return
        try:
            ready, value = self._decode(raw)
        except ValueError:  # not a result Celery wrote: not ours to judge
            return
        if ready:
            for future in waiting:
                if not future.done():
                    future.set_result(value)

    async def _sync(self) -> None:
        next_check = time.monotonic() + RECHECK_S
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_check - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()
            if self._closed:  # (a cancel that redis-py turned into a connection error)
                return
            recheck = time.monotonic() >= next_check
            try:
                await self._subscribe_all(recheck)
                self.lost = None
                if recheck:
                    next_check = time.monotonic() + RECHECK_S
            except Exception as exc:  # Redis' errors, and any other: start over
                if not isinstance(exc, RedisError | OSError):
                    log.warning("result hub: subscribing failed: %r", exc)
                self.lost = exc
                await self._drop(exc)
                await asyncio.sleep(OUTAGE_POLL_S)
                self._wake.set()

    async def _subscribe_all(self, recheck: bool) -> None:
        if self._pubsub is None and not self._waiters:
            return
        if self._pubsub is None:
            self._pubsub = self._make_pubsub()
            self._subscribed = set()
        pubsub = self._pubsub
        stale = [key for key in self._subscribed if key not in self._waiters]
        for part in _parts(stale):
            await pubsub.unsubscribe(*part)
        self._subscribed.difference_update(stale)
        new = [key for key in self._waiters if key not in self._subscribed]
        if new:
            loop = asyncio.get_running_loop()
            confirmations = []
            for key in new:
                confirmation: asyncio.Future[None] = loop.create_future()
                self._confirming[key] = confirmation
                confirmations.append(confirmation)
            self._subscribed.update(new)
            for part in _parts(new):
                await pubsub.subscribe(*part)
            if self._reader is None or self._reader.done():
                self._reader = loop.create_task(self._read(pubsub), name="toolq-result-reader")
            await asyncio.gather(*confirmations)
        # Subscribed first, then the stored results: nothing falls between the two.
        check = list(self._waiters) if recheck else [key for key in new if key in self._waiters]
        for part in _parts(check):
            for key, raw in zip(part, await self._read_stored(part), strict=True):
                self._deliver(key, raw)

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=READ_POLL_S)
                if message is None:
                    continue
                kind, key = message.get("type"), _text(message.get("channel"))
                if kind == "message":
                    self._deliver(key, message.get("data"))
                elif kind == "subscribe":
                    confirmation = self._confirming.pop(key, None)
                    if confirmation is not None and not confirmation.done():
                        confirmation.set_result(None)
        except Exception as exc:  # Redis' errors, and any other: start over, never hang
            if self._pubsub is pubsub:
                if not isinstance(exc, RedisError | OSError):
                    log.warning("result hub: reading pub/sub failed: %r", exc)
                self.lost = exc
                await self._drop(exc)
                self._wake.set()

    async def _drop(self, exc: BaseException) -> None:
        """Forget the connection and its subscriptions (the syncer starts over)."""
        pubsub, self._pubsub = self._pubsub, None
        self._subscribed = set()
        confirming, self._confirming = self._confirming, {}
        for confirmation in confirming.values():
            if not confirmation.done():
                confirmation.set_exception(exc)
                confirmation.exception()  # retrieved: it is reported by the syncer
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._reader = None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        for task in (self._syncer, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._syncer = self._reader = None
        for waiting in self._waiters.values():
            for future in waiting:
                future.cancel()
        self._waiters.clear()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


class AsyncToolClient:
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
        if settings is None:
            overrides = {"redis_url": redis_url} if redis_url else None
            settings = load_settings(config, profile, overrides=overrides)
        self.settings = settings
        self._sealer = load_sealer(settings)  # with a secret key, every env goes sealed
        self._signer = load_signer(settings)  # and every call is signed
        self.app: Celery = capture_app(settings)  # builds messages, never connects
        self._backend: Any = self.app.backend
        self._redis: aioredis.Redis | None = None
        self._pubsub_redis: aioredis.Redis | None = None
        self._slots: asyncio.Semaphore | None = None
        self._hub: _Hub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned_queues: set[str] = set()
        self._queue_looks: dict[str, tuple[float, bool]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # -- connections ---------------------------------------------------------------

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._redis = async_redis_client(self.settings)
            self._pubsub_redis = async_redis_client(self.settings, retries=0)
            self._slots = asyncio.Semaphore(COMMAND_CONNECTIONS)
            pubsub_redis = self._pubsub_redis
            self._hub = _Hub(
                lambda: pubsub_redis.pubsub(),
                self._mget,
                lambda raw: decode_stored(self._backend, raw),
            )
        elif self._loop is not loop:
            raise RuntimeError(
                "this AsyncToolClient belongs to another event loop: make one per loop"
            )

    async def _command(self, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one command (or pipeline) on at most :data:`COMMAND_CONNECTIONS`
        connections; Redis' errors become :class:`BrokerUnavailable`."""
        self._bind()
        assert self._slots is not None and self._redis is not None
        async with self._slots:
            try:
                return await command(self._redis)
            except (RedisError, OSError) as exc:
                raise _unavailable(self.settings.redis_url, exc) from exc

    async def _get(self, key: str) -> Any:
        return await self._command(lambda r: r.get(key))

    async def _mget(self, keys: list[str]) -> list[Any]:
        self._bind()
        assert self._slots is not None and self._redis is not None
        async with self._slots:  # Redis' own errors: the hub rides them out
            return list(await self._redis.mget(keys))

    def _result_key(self, call_id: str) -> str:
        return _text(self._backend.get_key_for_task(call_id))

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
        return entries_of(
            lambda: send_call(
                self.app, request, call_id, queue, self._sealer, signer=self._signer, retry=False
            )
        )

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
                if time.monotonic() + _REFUSED_RETRY_S >= deadline:
                    raise
                await asyncio.sleep(_REFUSED_RETRY_S)

    async def _queue(self, tool_id: str, queue: str | None) -> str:
        """The queue a call goes to; warnings as ``ToolClient`` gives them (a queue no
        configured worker reads; no live worker, looked at most every few seconds)."""
        queue = queue or self.settings.queue_for(tool_id)
        if queue not in self.settings.all_queues and queue not in self._warned_queues:
            self._warned_queues.add(queue)
            log.warning(
                "queue %r is not in this configuration (%s): the call waits until a worker "
                "started with --queues %s takes it",
                queue,
                ", ".join(self.settings.all_queues),
                queue,
            )
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
        cap = self.settings.queue_cap(queue)
        if cap is None:
            return
        deadline = time.monotonic() + (0.0 if block is None else seconds(block, "block"))
        while (length := await self.queue_length(queue)) + needed > cap:
            if needed > cap or time.monotonic() >= deadline:
                raise QueueFull(queue, length, cap, needed)
            await asyncio.sleep(QUEUE_FULL_POLL_S)

    async def _claim(self, idempotency_key: str, call_id: str, request: CallRequest) -> str | None:
        key = self.settings.keys.idempotency(idempotency_key)
        ttl = max(1, int(self.settings.idempotency_ttl_s))
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
        requests = [
            prepare_request(
                self.settings,
                tool_id,
                item,
                env,
                timeout,
                config=config,
                max_attempts=max_attempts,
                retry=retry,
                priority=priority,
                cache=cache,
                index=index,
            )
            for index, item in enumerate(inputs)
        ]
        plan = plan_chunks(requests, self._sealer, chunk_size)
        queue = await self._queue(tool_id, queue)
        await self._make_room(queue, block, len(plan.chunks))
        entries: list[tuple[str, str]] = []
        for chunk in plan.chunks:
            if len(chunk) == 1:  # a call alone is sent as a single call
                call_id = chunk[0].call_id
                entries += self._call_entries(plan.requests[call_id], call_id, queue)
            else:
                entries += entries_of(
                    functools.partial(send_chunk, self.app, chunk, queue, self._signer)
                )
        await self._push(entries)
        return [AsyncToolCall(call_id, tool_id, self) for call_id in plan.requests]

    # -- results -------------------------------------------------------------------

    async def _wait(self, calls: Sequence[AsyncToolCall], wait_s: float | None) -> dict[str, Any]:
        """Every call's result value by id, or :class:`ResultTimeout` (the first call not
        done) after ``wait_s``; :class:`BrokerUnavailable` if Redis was away then."""
        self._bind()
        assert self._hub is not None
        keys = {self._result_key(call.id): call for call in calls}
        if not keys:
            return {}
        futures = self._hub.watch(keys)
        try:
            _, pending = await asyncio.wait(futures.values(), timeout=wait_s)
            if pending:
                if self._hub.lost is not None:
                    raise _unavailable(self.settings.redis_url, self._hub.lost)
                missing = next(keys[key] for key, future in futures.items() if future in pending)
                raise ResultTimeout(missing.id, wait_s or 0.0)
            return {keys[key].id: future.result() for key, future in futures.items()}
        finally:
            self._hub.unwatch(futures)

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
        self._bind()
        assert self._hub is not None
        wait_s = None if wait is None else seconds(wait, "wait")
        deadline = None if wait_s is None else time.monotonic() + wait_s
        keys = {self._result_key(call.id): call for call in calls}
        futures = self._hub.watch(keys)
        by_future = {future: key for key, future in futures.items()}
        pending: set[asyncio.Future[Any]] = set(futures.values())
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if self._hub.lost is not None:
                        raise _unavailable(self.settings.redis_url, self._hub.lost)
                    missing = keys[by_future[next(iter(pending))]]
                    raise ResultTimeout(missing.id, wait_s or 0.0)
                for future in done:
                    call = keys[by_future[future]]
                    yield to_result(future.result(), call.id, call.tool_id)
        finally:
            self._hub.unwatch(futures)

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
        validate_call_id(call_id)
        key = self._result_key(call_id)
        raw = await self._get(key)
        if raw is not None and decode_stored(self._backend, raw)[0]:
            return "finished"
        now = time.time()
        stored_key, value, expires = stored_failure(
            self.app, call_id, cancelled_failure(call_id, tool_id, now)
        )

        async def write(r: aioredis.Redis) -> Any:
            async with r.pipeline(transaction=True) as pipe:
                mark_cancelled(pipe, self.settings.keys, call_id, now)
                pipe.set(stored_key, value, ex=expires)
                pipe.publish(stored_key, value)
                return await pipe.execute()

        await self._command(write)
        return "cancelled"

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
        return 0 if self._hub is None else self._hub.waiting

    async def close(self) -> None:
        """Stop every wait and close the client's connections."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._hub is not None:
            await self._hub.close()
        for client in (self._redis, self._pubsub_redis):
            if client is not None:
                await client.aclose()
                await client.connection_pool.disconnect()
        self.app.close()
        self._redis = self._pubsub_redis = None
        self._hub = None
        self._loop = None

    async def __aenter__(self) -> AsyncToolClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _parts(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), PART):
        yield items[start : start + PART]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
