"""Idempotency keys bound to what was asked, as Stripe's are.

An idempotency key names one request, not just one string: the first enqueue under a
key records the call's id with the tool id and a hash of its input and config (the
project is in the Redis key's prefix already). Enqueueing again under the key returns
that call, if the tool and the hash agree; otherwise it is refused with
:class:`InvalidInput` (``run html --idempotency-key order-42`` then ``run cached
{"amount": 100} --idempotency-key order-42`` used to return the html call's result).

The env is not in the hash: it holds the caller's secrets, and a hash of a weak secret
kept in Redis for a day could be guessed offline. A record written before this (the
bare call id) is honoured as it was.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import redis

from toolq.errors import InvalidInput
from toolq.protocol import CallRequest

MAX_KEY_LENGTH = 256


def fingerprint(request: CallRequest) -> str:
    """The hash of what a call asks, apart from its env: the tool's input and config."""
    canonical = json.dumps(
        [request.input, request.config], sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def claim(
    client: redis.Redis,
    key: str,
    idempotency_key: str,
    call_id: str,
    request: CallRequest,
    ttl_s: int,
) -> str | None:
    """Reserve ``key`` (the Redis key for ``idempotency_key``) for ``call_id``; return the
    earlier call's id if the key was used for the same request, refuse it if for another."""
    value = record(idempotency_key, call_id, request)
    if client.set(key, value, nx=True, ex=ttl_s):
        return None
    return judge(client.get(key), idempotency_key, request)


def record(idempotency_key: str, call_id: str, request: CallRequest) -> str:
    """What the key holds for ``call_id`` (:class:`InvalidInput` for a key out of bounds):
    the sync and asyncio clients' :func:`claim` write this with ``SET NX``."""
    if not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= MAX_KEY_LENGTH:
        raise InvalidInput(
            f"idempotency_key must be 1 to {MAX_KEY_LENGTH} characters", "ValidationError"
        )
    return json.dumps(
        {"id": call_id, "tool_id": request.tool_id, "hash": fingerprint(request)},
        separators=(",", ":"),
    )


def judge(stored: Any, idempotency_key: str, request: CallRequest) -> str | None:
    """The key was taken and holds ``stored``: the first call's id if it asked the same
    (None if the key expired in between: this call goes ahead), refused otherwise."""
    if not isinstance(stored, bytes):
        return None  # expired in between: this call goes ahead, unrecorded
    try:
        first = json.loads(stored)
    except ValueError:
        return stored.decode()  # a record from before keys were bound: the bare call id
    if not isinstance(first, dict) or not isinstance(first.get("id"), str):
        return None
    if first.get("tool_id") != request.tool_id:
        raise InvalidInput(
            f"idempotency key {idempotency_key!r} was first used for tool "
            f"{first.get('tool_id')!r}, not {request.tool_id!r}: use a new key",
            "IdempotencyKeyReused",
        )
    if first.get("hash") != fingerprint(request):
        raise InvalidInput(
            f"idempotency key {idempotency_key!r} was first used for {request.tool_id} with "
            "other input or config: use a new key for a different request",
            "IdempotencyKeyReused",
        )
    return str(first["id"])
