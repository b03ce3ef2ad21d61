"""Wait for many calls' results at once (``ToolClient.gather`` and ``map``).

Celery's Redis backend stores each result under its key and publishes it on a channel
of the same name. Waiting call by call costs a subscription and a read per call;
here one pub/sub connection subscribes to every channel and one MGET reads the
results already stored, then results arrive as they are published. An MGET again
every second (and after Redis comes back) catches any result published while the
connection was away, so an outage shorter than the wait is ridden out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from celery import Celery, states
from redis.exceptions import RedisError

from toolq.errors import BrokerUnavailable

RECHECK_S = 1.0
"""How often the stored results are read again, beside the published ones."""
OUTAGE_POLL_S = 0.5
PART = 1000
"""Channels per SUBSCRIBE and keys per MGET."""


def collect(
    app: Celery, client: redis.Redis, call_ids: Sequence[str], deadline: float | None
) -> dict[str, Any]:
    """Each call's result value (an envelope, or the exception Celery stored), by id,
    for every call that ended before ``deadline`` (``time.monotonic()``; None: all)."""
    backend: Any = app.backend
    keys = {text(backend.get_key_for_task(call_id)): call_id for call_id in call_ids}
    done: dict[str, Any] = {}
    lost: Exception | None = None
    while len(done) < len(keys):
        if deadline is not None and time.monotonic() >= deadline:
            break
        try:
            _wait(backend, client, keys, done, deadline)
            lost = None
        except (RedisError, OSError) as exc:
            lost = exc
            time.sleep(OUTAGE_POLL_S)
    if lost is not None and len(done) < len(keys):
        raise BrokerUnavailable(f"cannot reach Redis: {lost}") from lost
    return done


def _wait(
    backend: Any,
    client: redis.Redis,
    keys: dict[str, str],
    done: dict[str, Any],
    deadline: float | None,
) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
    try:
        for part in parts([key for key, call_id in keys.items() if call_id not in done]):
            pubsub.subscribe(*part)
        next_check = 0.0
        while len(done) < len(keys):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if now >= next_check:  # subscribed first, so nothing falls between the two
                _read_stored(backend, client, keys, done)
                next_check = now + RECHECK_S
                continue
            wait = next_check - now if deadline is None else min(next_check, deadline) - now
            message = pubsub.get_message(timeout=max(wait, 0.001))
            if message is not None and message.get("type") == "message":
                _take(backend, keys.get(text(message["channel"])), message["data"], done)
    finally:
        pubsub.close()


def _read_stored(
    backend: Any, client: redis.Redis, keys: dict[str, str], done: dict[str, Any]
) -> None:
    pending = [key for key, call_id in keys.items() if call_id not in done]
    for part in parts(pending):
        for key, raw in zip(part, client.mget(part), strict=True):
            if raw is not None:
                _take(backend, keys[key], raw, done)


def _take(backend: Any, call_id: str | None, raw: Any, done: dict[str, Any]) -> None:
    if call_id is None or call_id in done:
        return
    ready, value = decode_stored(backend, raw)
    if ready:
        done[call_id] = value


def decode_stored(backend: Any, raw: Any) -> tuple[bool, Any]:
    """``(True, value)`` for a stored or published result of a call that ended (its
    envelope, or the exception Celery stored); ``(False, None)`` for any other state."""
    meta = json.loads(raw)  # the result backend's serializer is JSON (celery_app.py)
    status = meta.get("status") if isinstance(meta, dict) else None
    if status == states.SUCCESS:
        return True, meta.get("result")
    if status in states.READY_STATES:  # Celery rebuilds the stored exception
        return True, backend.decode_result(raw).get("result")
    return False, None


def parts(items: list[str]) -> Iterator[list[str]]:
    """``items`` :data:`PART` at a time (channels per SUBSCRIBE, keys per MGET)."""
    for start in range(0, len(items), PART):
        yield items[start : start + PART]


def text(value: Any) -> str:
    """A key or channel name as redis-py returns it (bytes or str), as a string."""
    return value.decode() if isinstance(value, bytes) else str(value)
