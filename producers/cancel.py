"""Cancel a call: ``toolq cancel CALL_ID`` and :meth:`ToolCall.cancel`.

Three writes: the id joins the project's cancelled set (workers load it when they
(re)subscribe), it is published on the cancel channel (the worker running it stops
Bun at once; :mod:`toolq.workers.cancel`), and a ``cancelled`` envelope is stored as
the call's result, so a caller waiting on it gets the answer now rather than when a
worker next sees the message. A queued call, or a retry waiting for its countdown,
is dropped by the worker that receives it; a call that already finished is left alone.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import redis
from celery import Celery, states
from celery.result import AsyncResult

from toolq.envelope import ToolResult
from toolq.errors import Cancelled, ToolCallFailed
from toolq.keys import CANCELLED_KEEP_S, Keys
from toolq.producers.collect import decode_stored, text
from toolq.validation import validate_call_id

CancelOutcome = Literal["cancelled", "finished"]


def cancel_call(
    client: redis.Redis, app: Celery, keys: Keys, call_id: str, tool_id: str = ""
) -> CancelOutcome:
    """Cancel ``call_id``; ``"finished"`` (nothing done) if it has a result already.
    :class:`InvalidInput` for an id that is not a call id (nothing is written)."""
    validate_call_id(call_id)
    stored = AsyncResult(call_id, app=app)
    if stored.state in states.READY_STATES:
        return "finished"
    now = time.time()
    with client.pipeline(transaction=True) as pipe:
        mark_cancelled(pipe, keys, call_id, now)
        pipe.execute()
    with warnings.catch_warnings():
        # Celery's Redis backend still calls redis-py's deprecated setex.
        warnings.simplefilter("ignore", DeprecationWarning)
        app.backend.store_result(call_id, cancelled_failure(call_id, tool_id, now), states.FAILURE)
    return "cancelled"


async def cancel_call_async(
    command: Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]],
    app: Celery,
    keys: Keys,
    call_id: str,
    tool_id: str = "",
) -> CancelOutcome:
    """:func:`cancel_call` for the asyncio client: the same three writes, in one pipeline
    run by ``command`` (the client's: it takes ``redis.asyncio`` work)."""
    validate_call_id(call_id)
    backend: Any = app.backend
    key = text(backend.get_key_for_task(call_id))
    raw = await command(lambda r: r.get(key))
    if raw is not None and decode_stored(backend, raw)[0]:
        return "finished"
    now = time.time()
    stored_key, value, expires = stored_failure(
        app, call_id, cancelled_failure(call_id, tool_id, now)
    )

    async def write(r: Any) -> Any:
        async with r.pipeline(transaction=True) as pipe:
            mark_cancelled(pipe, keys, call_id, now)
            pipe.set(stored_key, value, ex=expires)
            pipe.publish(stored_key, value)
            return await pipe.execute()

    await command(write)
    return "cancelled"


def mark_cancelled(pipe: Any, keys: Keys, call_id: str, now: float) -> None:
    """Queue a cancel's first two writes on ``pipe`` (sync or asyncio): the id joins the
    cancelled set (entries older than a day dropped) and is published to the workers."""
    pipe.zadd(keys.cancelled, {call_id: now})
    pipe.zremrangebyscore(keys.cancelled, "-inf", now - CANCELLED_KEEP_S)
    pipe.publish(keys.cancel_channel, call_id)


def cancelled_failure(call_id: str, tool_id: str, now: float) -> ToolCallFailed:
    """The result a cancel stores (Celery state FAILURE): a ``cancelled`` envelope."""
    stopped = Cancelled("the call was cancelled", "Cancelled")
    envelope = ToolResult.failed(call_id, tool_id, stopped, {"cancelled_at": now}).to_dict()
    return ToolCallFailed(envelope)


def stored_failure(app: Celery, call_id: str, failure: Exception) -> tuple[str, str, int | None]:
    """``(key, value, expires)`` that Celery's Redis backend writes (SET, then PUBLISH on
    the key) to store ``failure`` as the call's result: for a client without Celery's
    synchronous backend (:func:`cancel_call_async`)."""
    backend: Any = app.backend
    meta = backend._get_result_meta(
        result=backend.encode_result(failure, states.FAILURE),
        state=states.FAILURE,
        traceback=None,
        request=None,
    )
    meta["task_id"] = call_id
    expires = getattr(backend, "failure_expires", None) or backend.expires
    key = text(backend.get_key_for_task(call_id))
    return key, backend.encode(meta), None if expires is None else int(expires)
