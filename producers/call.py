"""Handles on one enqueued call: :class:`ToolCall` (``ToolClient``'s) and
:class:`AsyncToolCall` (``AsyncToolClient``'s, every method a coroutine). A handle holds
the call's id and tool id; waiting, state and cancel go through its client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from toolq.envelope import ToolResult
from toolq.errors import BrokerUnavailable, ResultTimeout
from toolq.producers.base import Duration, redis_errors, seconds, to_result
from toolq.producers.cancel import CancelOutcome
from toolq.producers.collect import decode_stored

if TYPE_CHECKING:
    from toolq.producers.aio import AsyncToolClient
    from toolq.producers.client import ToolClient

_OUTAGE_POLL_S = 0.5
"""How often a caller waiting for a result tries Redis again while it is away."""


class ToolCall:
    """A handle on an enqueued call. ``id`` is stable; ``result()`` waits for the envelope."""

    def __init__(
        self,
        call_id: str,
        tool_id: str,
        async_result: AsyncResult,
        url: str,
        client: ToolClient | None = None,
    ) -> None:
        self.id = call_id
        self.tool_id = tool_id
        self._async = async_result
        self._url = url
        self._client = client

    def cancel(self) -> CancelOutcome:
        """Cancel the call: a queued one never runs, a running one is stopped (SIGTERM,
        then SIGKILL after its grace), a waiting retry is dropped; ``result()`` returns
        ``cancelled`` at once. ``"finished"`` if it had already ended (nothing changes)."""
        if self._client is None:
            raise RuntimeError("this ToolCall has no client to cancel through")
        return self._client.cancel(self.id, self.tool_id)

    def __repr__(self) -> str:
        return f"ToolCall(id={self.id!r}, tool_id={self.tool_id!r})"

    def ready(self) -> bool:
        with redis_errors(self._url):
            return bool(self._async.ready())

    def state(self) -> str:
        """Celery's view: PENDING (queued or unknown), STARTED, SUCCESS or FAILURE."""
        with redis_errors(self._url):
            return str(self._async.state)

    def result(self, timeout: Duration | None = None) -> ToolResult:
        """Wait for the call to finish; raise :class:`ResultTimeout` after ``timeout``.

        Celery's result drainer checks the deadline about once a second, so a
        sub-second ``timeout`` may wait up to a second. A Redis outage shorter than
        ``timeout`` is ridden out; a longer one raises :class:`BrokerUnavailable` at the
        deadline.
        """
        wait_s = None if timeout is None else seconds(timeout, "timeout")
        deadline = None if wait_s is None else time.monotonic() + wait_s
        try:
            with redis_errors(self._url):
                value = self._async.get(timeout=wait_s, propagate=False, interval=0.05)
        except CeleryTimeoutError:
            self._stop_waiting()
            raise ResultTimeout(self.id, wait_s or 0.0) from None
        except BrokerUnavailable as lost:
            value = self._through_outage(lost, deadline, wait_s or 0.0)
        return to_result(value, self.id, self.tool_id)

    def _through_outage(
        self, lost: BrokerUnavailable, deadline: float | None, wait_s: float
    ) -> Any:
        """Ride out a Redis outage until our own deadline (without one: as long as it takes).

        Celery's pub/sub result consumer does not reliably see a result stored while it
        was disconnected, so this polls the stored state instead, every half second.
        """
        probe = AsyncResult(self.id, app=self._async.app)
        last: BrokerUnavailable | None = lost
        while deadline is None or time.monotonic() < deadline:
            time.sleep(_OUTAGE_POLL_S)
            try:
                with redis_errors(self._url):
                    if probe.state in states.READY_STATES:
                        self._stop_waiting()
                        return probe.result
                last = None
            except BrokerUnavailable as exc:
                last = exc
        if last is not None:
            raise last
        self._stop_waiting()
        raise ResultTimeout(self.id, wait_s)

    def _stop_waiting(self) -> None:
        """Drop Celery's pub/sub subscription for this call now, while Redis answers: a
        caller that stopped waiting holds none (Celery would otherwise drop it at garbage
        collection, and print a traceback if Redis is gone by then)."""
        with contextlib.suppress(Exception):
            self._async.backend.remove_pending_result(self._async)

    def forget(self) -> None:
        """Drop the stored result from Redis."""
        with redis_errors(self._url):
            self._async.forget()


class AsyncToolCall:
    """A handle on an enqueued call (asyncio). ``id`` is stable; ``await result()``."""

    def __init__(self, call_id: str, tool_id: str, client: AsyncToolClient) -> None:
        self.id = call_id
        self.tool_id = tool_id
        self._client = client

    def __repr__(self) -> str:
        return f"AsyncToolCall(id={self.id!r}, tool_id={self.tool_id!r})"

    async def result(
        self, timeout: Duration | None = None, *, cancel_on_exit: bool = False
    ) -> ToolResult:
        """Wait for the call to finish; :class:`ResultTimeout` after ``timeout`` (a Redis
        outage longer than it: :class:`BrokerUnavailable`). Cancelling the awaiting task
        leaves the call running unless ``cancel_on_exit`` (then it is cancelled when the
        wait ends without a result: task cancelled or timeout)."""
        wait_s = None if timeout is None else seconds(timeout, "timeout")
        try:
            values = await self._client._wait([self], wait_s)
        except (asyncio.CancelledError, ResultTimeout, BrokerUnavailable):
            if cancel_on_exit:
                await self._client._cancel_anyway(self.id, self.tool_id)
            raise
        return to_result(values[self.id], self.id, self.tool_id)

    async def cancel(self) -> CancelOutcome:
        """Cancel the call (see :meth:`toolq.ToolCall.cancel`)."""
        return await self._client.cancel(self.id, self.tool_id)

    async def state(self) -> str:
        """Celery's view: PENDING (queued or unknown), SUCCESS or FAILURE."""
        raw = await self._client._get(self._client._result_key(self.id))
        if raw is None:
            return str(states.PENDING)
        meta = json.loads(raw)
        return str(meta.get("status", states.PENDING)) if isinstance(meta, dict) else "PENDING"

    async def ready(self) -> bool:
        raw = await self._client._get(self._client._result_key(self.id))
        return raw is not None and bool(decode_stored(self._client._backend, raw)[0])

    async def forget(self) -> None:
        """Drop the stored result from Redis."""
        key = self._client._result_key(self.id)
        await self._client._command(lambda r: r.delete(key))
