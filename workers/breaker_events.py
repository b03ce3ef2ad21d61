"""This worker's view of which tools' breakers are closed and clean, kept current by the
event every recorded verdict publishes — so a call to a healthy tool costs no Redis
round trip (:class:`toolq.workers.breaker.Breakers` asks :class:`Health` first).

Its own module because it is its own mechanism: a pub/sub listener thread per process
with a local cache, where :mod:`toolq.workers.breaker` is the breakers' state in Redis.
The two meet only in the event, one line on the ``breaker_events`` channel:
``"<tool id> <state> <consecutive failures> <failures in the window>"``, published by
the record script and by a manual reset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import redis

log = logging.getLogger("toolq.worker")


class Health:
    """This worker's view of which tools' breakers are closed and *clean* (no failure in a
    row, none in the window), kept current by the events every recorded verdict publishes.

    A call to a clean tool costs no Redis round trip: it is admitted here, and its success
    is counted here and sent with the tool's next recorded verdict (the window stays
    exact; a success cannot change a clean breaker). While the subscription is down —
    Redis restarting, a fresh process — nothing is clean and every call asks Redis.
    A verdict recorded on another worker reaches this one within a pub/sub delivery: in
    that moment a call may still be admitted here, as it would have been a moment
    earlier.
    """

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._lock = threading.Lock()
        self._clean: set[str] = set()
        self._versions: dict[str, int] = {}
        self._skipped: dict[str, int] = {}
        self._live = False
        self._pid: int | None = None

    def clean(self, tool_id: str) -> bool:
        self._ensure_listening()
        return self._live and tool_id in self._clean

    def version(self, tool_id: str) -> int:
        return self._versions.get(tool_id, 0)

    def learned(self, tool_id: str, clean: bool, version: int) -> None:
        """What a script returned; ignored if an event about this tool came meanwhile."""
        with self._lock:
            if self._versions.get(tool_id, 0) != version:
                return
            if clean:
                self._clean.add(tool_id)
            else:
                self._clean.discard(tool_id)

    def skip(self, tool_id: str) -> None:
        with self._lock:
            self._skipped[tool_id] = self._skipped.get(tool_id, 0) + 1

    def take_skipped(self, tool_id: str) -> int:
        with self._lock:
            return self._skipped.pop(tool_id, 0)

    def _event(self, data: bytes) -> None:
        try:
            tool_id, state, failures, failed = data.decode().split(" ")
        except ValueError:
            return
        with self._lock:
            self._versions[tool_id] = self._versions.get(tool_id, 0) + 1
            if state == "closed" and failures == "0" and failed == "0":
                self._clean.add(tool_id)
            else:
                self._clean.discard(tool_id)

    def _ensure_listening(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            self._pid = pid  # a forked pool process: its own subscription, its own view
            self._live = False
            self._clean.clear()
            self._skipped.clear()
        threading.Thread(target=self._listen, name="toolq-breaker-events", daemon=True).start()

    def _listen(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._channel)
                pubsub.get_message(timeout=1.0)  # the subscription is confirmed
                with self._lock:
                    self._live = True
                while self._pid == pid:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._event(message["data"])
            except Exception:  # Redis gone: ask it for every call until it is back
                log.debug("breaker events unavailable", exc_info=True)
            finally:
                with self._lock:
                    self._live = False
                    self._clean.clear()
                with contextlib.suppress(Exception):
                    pubsub.close()
            time.sleep(1.0)
