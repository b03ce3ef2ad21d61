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
from typing import Literal

import redis
from celery import Celery, states
from celery.result import AsyncResult

from toolq.envelope import ToolResult
from toolq.errors import Cancelled, ToolCallFailed
from toolq.keys import CANCELLED_KEEP_S, Keys
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
        pipe.zadd(keys.cancelled, {call_id: now})
        pipe.zremrangebyscore(keys.cancelled, "-inf", now - CANCELLED_KEEP_S)
        pipe.publish(keys.cancel_channel, call_id)
        pipe.execute()
    stopped = Cancelled("the call was cancelled", "Cancelled")
    envelope = ToolResult.failed(call_id, tool_id, stopped, {"cancelled_at": now}).to_dict()
    with warnings.catch_warnings():
        # Celery's Redis backend still calls redis-py's deprecated setex.
        warnings.simplefilter("ignore", DeprecationWarning)
        app.backend.store_result(call_id, ToolCallFailed(envelope), states.FAILURE)
    return "cancelled"
