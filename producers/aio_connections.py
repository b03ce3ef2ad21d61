"""An asyncio client's Redis connections, bound to the event loop they are first used in.

At most :data:`COMMAND_CONNECTIONS` connections run commands (a semaphore holds the
rest back), and one more carries the pub/sub of the :class:`~toolq.producers.hub.ResultHub`
that every waiter shares: three in all, whatever the number of awaiting tasks.
``redis.asyncio`` connections belong to one loop, so a second loop is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from toolq.config.connections import async_redis_client
from toolq.config.settings import Settings
from toolq.producers.base import unavailable
from toolq.producers.hub import ResultHub

T = TypeVar("T")

COMMAND_CONNECTIONS = 2
"""Redis connections a client uses for commands at most (its pub/sub one is a third)."""


class LoopConnections:
    """Opened on first use (:meth:`bind`), in the running loop; :meth:`close` lets them
    be opened again, in any loop."""

    def __init__(self, settings: Settings, decode: Callable[[Any], tuple[bool, Any]]) -> None:
        self._settings = settings
        self._decode = decode
        """Decodes a stored result for the hub: ``(ended, value)``."""
        self._redis: aioredis.Redis | None = None
        self._pubsub_redis: aioredis.Redis | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.hub: ResultHub | None = None

    def bind(self) -> ResultHub:
        """Open the connections in the running loop (once); the result hub."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._redis = async_redis_client(self._settings)
            self._pubsub_redis = async_redis_client(self._settings, retries=0)
            self._slots = asyncio.Semaphore(COMMAND_CONNECTIONS)
            pubsub_redis = self._pubsub_redis
            self.hub = ResultHub(
                lambda: pubsub_redis.pubsub(),
                self.mget,
                self._decode,
                self._settings.redis_url,
            )
        elif self._loop is not loop:
            raise RuntimeError(
                "this AsyncToolClient belongs to another event loop: make one per loop"
            )
        assert self.hub is not None
        return self.hub

    async def command(self, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one command (or pipeline) on at most :data:`COMMAND_CONNECTIONS`
        connections; Redis' errors become :class:`BrokerUnavailable`."""
        self.bind()
        assert self._slots is not None and self._redis is not None
        async with self._slots:
            try:
                return await command(self._redis)
            except (RedisError, OSError) as exc:
                raise unavailable(self._settings.redis_url, exc) from exc

    async def mget(self, keys: list[str]) -> list[Any]:
        """The hub's reads: Redis' own errors pass (the hub rides them out)."""
        self.bind()
        assert self._slots is not None and self._redis is not None
        async with self._slots:
            return list(await self._redis.mget(keys))

    async def close(self) -> None:
        """Stop the hub (every wait) and close the connections."""
        if self.hub is not None:
            await self.hub.close()
        for client in (self._redis, self._pubsub_redis):
            if client is not None:
                await client.aclose()
                await client.connection_pool.disconnect()
        self._redis = self._pubsub_redis = None
        self.hub = None
        self._loop = None
