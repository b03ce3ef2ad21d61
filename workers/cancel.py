"""A worker's view of cancelled calls, kept in memory so checking costs no round trip.

``toolq cancel`` (:mod:`toolq.producers.cancel`) adds the call id to a sorted set and
publishes it on the project's cancel channel. Each worker process subscribes once
(one connection, one thread) and keeps the ids of the last day in memory, loaded from
the set on (re)connection: so the handler asks "is this call cancelled?" for free, and
a call running here is stopped the moment the id arrives (its :class:`CancelToken`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.client import PubSub
from redis.exceptions import RedisError

from toolq.keys import CANCELLED_KEEP_S, Keys
from toolq.validation import CALL_ID
from toolq.workers.runtime.base import CancelToken

log = logging.getLogger("toolq.worker")

RECONNECT_S = 1.0
LISTEN_S = 1.0
"""How long one wait for a message lasts (so the thread sees a shutdown)."""


class CancelWatch:
    """Cancelled ids, and the tokens of the calls running in this process."""

    def __init__(self, client: redis.Redis | None, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._lock = threading.Lock()
        self._cancelled: dict[str, float] = {}
        self._running: dict[str, CancelToken] = {}
        self._pid: int | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        """Subscribe and load the cancelled ids, before the first call is checked (once
        per process: a prefork child starts its own); then listen in a thread."""
        if self.client is None or self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._stopped.clear()
        pubsub = self._subscribe()
        threading.Thread(
            target=self._listen, args=(pubsub,), name="toolq-cancel", daemon=True
        ).start()

    def close(self) -> None:
        self._stopped.set()

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
        """Remember the id; stop the call if it runs here. An id toolq never makes
        (written to Redis by hand, or by an older producer) is ignored: kept, each would
        hold this worker's memory for a day."""
        if not CALL_ID.fullmatch(call_id):
            return
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

    def _subscribe(self) -> PubSub | None:
        """Subscribed first, then loaded: no id falls between the two."""
        assert self.client is not None
        pubsub: PubSub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.keys.cancel_channel)
            since = time.time() - CANCELLED_KEEP_S
            entries: Any = self.client.zrangebyscore(
                self.keys.cancelled, since, "+inf", withscores=True
            )
        except (RedisError, OSError):
            log.warning("cannot subscribe to cancellations; trying again")
            pubsub.close()
            return None
        for raw, score in entries:
            self.cancelled(raw.decode(), float(score))
        return pubsub

    def _listen(self, pubsub: PubSub | None) -> None:
        while not self._stopped.is_set():
            if pubsub is None:
                time.sleep(RECONNECT_S)
                pubsub = self._subscribe()
                continue
            try:
                while not self._stopped.is_set():
                    message = pubsub.get_message(timeout=LISTEN_S)
                    data = message.get("data") if message else None
                    if isinstance(data, bytes):
                        self.cancelled(data.decode())
            except Exception:  # the connection is gone (or closed at shutdown)
                if not self._stopped.is_set():
                    log.warning("cancel channel lost; subscribing again")
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
                pubsub = None
