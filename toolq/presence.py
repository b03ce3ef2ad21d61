"""Which queues a live worker consumes, from the heartbeats workers already send.

A Celery worker sends a heartbeat event every 2 s. A toolq worker listens to its own
(Celery's ``heartbeat_sent`` signal) and, with the same beat, stamps itself into one
sorted set per queue it consumes (:func:`toolq.keys.queue_workers`: hostname -> Redis
time), dropping entries older than :data:`STALE_S`; it removes itself when it stops.
A producer asks "does a worker consume this queue?" with one ``ZCOUNT`` (Redis' clock
on both sides), at most once per :data:`CHECK_EVERY_S` per queue — never a broadcast,
nothing per call in a loop. The answer only ever warns: a call is enqueued either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import RedisError

from toolq.keys import queue_workers

if TYPE_CHECKING:
    from toolq.config.settings import Settings

log = logging.getLogger("toolq.presence")

STALE_S = 10.0
"""A worker whose last heartbeat is older than this does not count as live (Celery
beats every 2 s; a loaded worker may be late)."""
CHECK_EVERY_S = 5.0
"""A producer looks at a queue's workers at most this often."""

_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stale = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - stale)
  redis.call('EXPIRE', key, math.ceil(stale * 6))
end
return 1
"""
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""


class Presence:
    """A worker's side: :meth:`beat` with each heartbeat, :meth:`leave` when it stops."""

    def __init__(
        self, client: redis.Redis, hostname: str, queues: Sequence[str], stale_s: float = STALE_S
    ) -> None:
        self.client = client
        self.hostname = hostname
        self.keys = [queue_workers(queue) for queue in queues]
        self.stale_s = stale_s
        self._beat = client.register_script(_BEAT)

    def beat(self) -> None:
        """Stamp this worker as live on its queues (a failure waits for the next beat)."""
        try:
            self._beat(keys=self.keys, args=[self.hostname, self.stale_s])
        except RedisError as exc:
            log.debug("presence beat failed: %s", exc)

    def leave(self) -> None:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key in self.keys:
                    pipe.zrem(key, self.hostname)
                pipe.execute()
        except RedisError as exc:
            log.debug("presence leave failed: %s", exc)


def live_workers(client: redis.Redis, queue: str, stale_s: float = STALE_S) -> int:
    """Workers that consumed ``queue`` and sent a heartbeat within ``stale_s``."""
    return int(client.eval(_COUNT, 1, queue_workers(queue), stale_s))


async def live_workers_async(client: Any, queue: str, stale_s: float = STALE_S) -> int:
    """:func:`live_workers` on a ``redis.asyncio`` client (the asyncio producer's)."""
    return int(await client.eval(_COUNT, 1, queue_workers(queue), stale_s))


class QueueWatch:
    """A producer's side: whether a queue has a live worker, looked up at most once per
    ``check_every_s`` per queue; thread-safe."""

    def __init__(
        self,
        client: Callable[[], redis.Redis],
        check_every_s: float = CHECK_EVERY_S,
        stale_s: float = STALE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.check_every_s = check_every_s
        self.stale_s = stale_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, bool]] = {}
        """queue -> (when looked, served)."""

    def newly_unserved(self, queue: str) -> bool:
        """True once when a look finds no live worker on ``queue`` after it had one (or on
        the first look); again only after a worker came and went. Unknown (Redis did not
        answer) counts as served: this only ever warns."""
        now = self._clock()
        with self._lock:
            previous = self._seen.get(queue)
            if previous is not None and now - previous[0] < self.check_every_s:
                return False
            # Stamp first, so concurrent callers do not look too.
            self._seen[queue] = (now, previous[1] if previous is not None else True)
        try:
            served = live_workers(self._client(), queue, self.stale_s) > 0
        except RedisError:
            served = True
        with self._lock:
            self._seen[queue] = (now, served)
        return not served and (previous is None or previous[1])

    def served(self, queue: str) -> bool:
        """A fresh look (for a command that reports it once); unknown counts as served."""
        try:
            served = live_workers(self._client(), queue, self.stale_s) > 0
        except RedisError:
            return True
        with self._lock:
            self._seen[queue] = (self._clock(), served)
        return served


def unserved_warning(settings: Settings, queue: str) -> str:
    """What to tell someone whose call went to a queue no live worker consumes."""
    config = f" --config {settings.source}" if settings.source != "defaults" else ""
    queues = f" --queues {queue}" if queue not in settings.all_queues else ""
    return (
        f"no live worker consumes queue {queue!r} (none sent a heartbeat in the last "
        f"{STALE_S:g}s): the call stays queued until one starts (`toolq worker{config}"
        f"{queues}`)"
    )
