"""The asyncio client's results: one pub/sub connection that every waiter shares.

Every waiter of an :class:`~toolq.AsyncToolClient` registers with its :class:`ResultHub`:
the hub subscribes to a call's result channel, and once Redis confirms the subscription
it reads the stored result (one ``MGET`` for every key subscribed together), so a result
published before the subscription is not missed. If the connection drops (a Redis
restart), the hub reconnects every half second, subscribes again to every awaited key
and reads them all again: a result stored meanwhile is found; nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from toolq.errors import ResultTimeout
from toolq.producers.base import unavailable
from toolq.producers.collect import parts, text

log = logging.getLogger("toolq.producer")

OUTAGE_POLL_S = 0.5
"""How often the result hub tries Redis again while it is away."""
RECHECK_S = 5.0
"""How often the hub reads every awaited result again beside the published ones: a
message lost on a connection that died silently is found within this."""
READ_POLL_S = 1.0


class ResultHub:
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
        url: str,
    ) -> None:
        self._make_pubsub = make_pubsub
        self._url = url
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

    async def completed(
        self, calls: Mapping[str, str], wait_s: float | None
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """``(call id, result value)`` for each call as its result arrives (``calls``:
        result key -> call id). After ``wait_s``: :class:`ResultTimeout` naming the first
        call (in ``calls``' order) not done, or :class:`BrokerUnavailable` if Redis was
        away then."""
        if not calls:
            return
        deadline = None if wait_s is None else time.monotonic() + wait_s
        futures = self.watch(calls)
        pending: set[asyncio.Future[Any]] = set(futures.values())
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if self.lost is not None:
                        raise unavailable(self._url, self.lost)
                    missing = next(key for key, future in futures.items() if future in pending)
                    raise ResultTimeout(calls[missing], wait_s or 0.0)
                for key, future in futures.items():
                    if future in done:
                        yield calls[key], future.result()
        finally:
            self.unwatch(futures)

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
        for part in parts(stale):
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
            for part in parts(new):
                await pubsub.subscribe(*part)
            if self._reader is None or self._reader.done():
                self._reader = loop.create_task(self._read(pubsub), name="toolq-result-reader")
            await asyncio.gather(*confirmations)
        # Subscribed first, then the stored results: nothing falls between the two.
        check = list(self._waiters) if recheck else [key for key in new if key in self._waiters]
        for part in parts(check):
            for key, raw in zip(part, await self._read_stored(part), strict=True):
                self._deliver(key, raw)

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=READ_POLL_S)
                if message is None:
                    continue
                kind, key = message.get("type"), text(message.get("channel"))
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
