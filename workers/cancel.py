"""A worker's view of cancelled calls, kept in memory so checking costs no round trip.

``toolq cancel`` (:mod:`toolq.producers.cancel`) adds the call id to a sorted set and
publishes it on the project's cancel channel. Each worker process subscribes once
(one connection, one thread) and keeps the ids of the last day in memory, loaded from
the set on (re)connection: so the handler asks "is this call cancelled?" for free, and
a call running here is stopped the moment the id arrives (its :class:`CancelToken`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.exceptions import RedisError

from toolq.keys import CANCELLED_KEEP_S, Keys
from toolq.workers.runtime.base import CancelToken

log = logging.getLogger("toolq.worker")

RECONNECT_S = 1.0


class CancelWatch:
    """Cancelled ids, and the tokens of the calls running in this process."""

    def __init__(self, client: redis.Redis | None, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._lock = threading.Lock()
        self._cancelled: dict[str, float] = {}
        self._running: dict[str, CancelToken] = {}
        self._pid: int | None = None

    def start(self) -> None:
        """Subscribe (once per process: a prefork child starts its own)."""
        if self.client is None or self._pid == os.getpid():
            return
        self._pid = os.getpid()
        threading.Thread(target=self._listen, name="toolq-cancel", daemon=True).start()

    def is_cancelled(self, call_id: str) -> bool:
        self.start()
        with self._lock:
            return call_id in self._cancelled

    @contextmanager
    def running(self, call_id: str) -> Iterator[CancelToken]:
        """A token for the call while it runs; set at once if it was cancelled meanwhile."""
        token = CancelToken()
        with self._lock:
            self._running[call_id] = token
            if call_id in self._cancelled:
                token.cancel()
        try:
            yield token
        finally:
            with self._lock:
                self._running.pop(call_id, None)
            token.close()

    def cancelled(self, call_id: str, at: float | None = None) -> None:
        """Remember the id; stop the call if it runs here."""
        now = time.time()
        with self._lock:
            self._cancelled[call_id] = now if at is None else at
            token = self._running.get(call_id)
            if token is not None:
                token.cancel()
            if len(self._cancelled) % 1024 == 0:
                self._cancelled = {
                    k: t for k, t in self._cancelled.items() if t > now - CANCELLED_KEEP_S
                }

    def _listen(self) -> None:
        assert self.client is not None
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.keys.cancel_channel)
                # Subscribed first, then loaded: no id falls between the two.
                since = time.time() - CANCELLED_KEEP_S
                entries: Any = self.client.zrangebyscore(
                    self.keys.cancelled, since, "+inf", withscores=True
                )
                for raw, score in entries:
                    self.cancelled(raw.decode(), float(score))
                for message in pubsub.listen():
                    data = message.get("data")
                    if isinstance(data, bytes):
                        self.cancelled(data.decode())
            except (RedisError, OSError):
                log.warning("cancel channel lost; subscribing again", exc_info=False)
                time.sleep(RECONNECT_S)
            finally:
                pubsub.close()
