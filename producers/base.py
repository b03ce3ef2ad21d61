"""What :class:`~toolq.ToolClient` and :class:`~toolq.AsyncToolClient` share: every step
of a call that does no I/O, written once.

Both clients load the same settings, sealer and signer; validate a call as a worker
would (:func:`prepare_request`); choose its queue and warn about one no configured
worker reads; cut a list of calls into chunks (:mod:`toolq.producers.chunks`) and build
every Celery message with the same ``send_call``/``send_chunk`` (the sync client
publishes them, the asyncio one records and pushes them: :mod:`toolq.producers.wire`);
apply one backpressure rule (:func:`has_room`); and turn what Celery stored into a
:class:`ToolResult` (:func:`to_result`), and name an unreachable Redis one way
(:func:`unavailable`, :func:`redis_errors`). What differs is the I/O alone: blocking
redis-py and Celery in :mod:`toolq.producers.client`, ``redis.asyncio`` in
:mod:`toolq.producers.aio`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from celery import Celery
from celery.exceptions import BackendGetMetaError, BackendStoreError, TimeLimitExceeded
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from toolq.config.celery_app import send_call, send_chunk
from toolq.config.durations import parse_duration
from toolq.config.loader import load_settings
from toolq.config.settings import Settings, redact_url
from toolq.envelope import ToolResult
from toolq.errors import (
    BrokerUnavailable,
    InvalidInput,
    QueueFull,
    ToolCallFailed,
    ToolCrashed,
    ToolTimeout,
)
from toolq.producers.chunks import ChunkPlan, plan_chunks
from toolq.protocol import CallRequest, new_request, validate
from toolq.sealing import load_sealer
from toolq.signing import load_signer

log = logging.getLogger("toolq.producer")

Duration = float | str
"""Seconds, or a duration string such as ``"30s"`` or ``"500ms"``."""
QUEUE_FULL_POLL_S = 0.05
"""How often ``enqueue(block=...)`` looks again at a full queue."""
REFUSED_RETRY_S = 0.2
"""How often enqueue tries again while Redis refuses connections (within the timeout)."""


class BaseClient:
    """A client's settings, sealer and signer, and its steps that do no I/O."""

    app: Celery
    """Builds every message: the producer's Celery app (set by the subclass)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: str | None = None,
        profile: str | None = None,
        redis_url: str | None = None,
    ) -> None:
        if settings is None:
            overrides = {"redis_url": redis_url} if redis_url else None
            settings = load_settings(config, profile, overrides=overrides)
        self.settings = settings
        self._sealer = load_sealer(settings)  # with a secret key, every env goes sealed
        self._signer = load_signer(settings)  # and every call is signed
        self._warned_queues: set[str] = set()

    def _chosen_queue(self, tool_id: str, queue: str | None) -> str:
        """The queue a call goes to; a warning (once) if no configured worker reads it."""
        queue = queue or self.settings.queue_for(tool_id)
        if queue not in self.settings.all_queues and queue not in self._warned_queues:
            self._warned_queues.add(queue)
            log.warning(
                "queue %r is not in this configuration (%s): the call waits until a worker "
                "started with --queues %s takes it%s",
                queue,
                ", ".join(self.settings.all_queues),
                queue,
                ""
                if self._signer is None
                else "; a worker of another project refuses it "
                f"(calls are signed for project {self._signer.project!r})",
            )
        return queue

    def _call_send(self, request: CallRequest, call_id: str, queue: str) -> Callable[[], Any]:
        """Sending one call's message (once: the client decides on retries)."""
        return functools.partial(
            send_call,
            self.app,
            request,
            call_id,
            queue,
            self._sealer,
            signer=self._signer,
            retry=False,
        )

    def _plan(
        self,
        tool_id: str,
        inputs: Iterable[Any],
        env: Mapping[str, str] | None,
        timeout: Duration | None,
        *,
        config: Mapping[str, Any] | None,
        max_attempts: int | None,
        retry: bool,
        priority: int | None,
        cache: bool,
        chunk_size: int | None,
    ) -> ChunkPlan:
        """``enqueue_many``'s calls, every input validated before anything is sent
        (:class:`InvalidInput` names the first bad one), cut into chunks."""
        requests = [
            prepare_request(
                self.settings,
                tool_id,
                item,
                env,
                timeout,
                config=config,
                max_attempts=max_attempts,
                retry=retry,
                priority=priority,
                cache=cache,
                index=index,
            )
            for index, item in enumerate(inputs)
        ]
        return plan_chunks(requests, self._sealer, chunk_size)

    def _chunk_sends(self, plan: ChunkPlan, queue: str) -> list[Callable[[], Any]]:
        """One send per message of ``plan``; a call alone is sent as a single call."""
        return [
            self._call_send(plan.requests[chunk[0].call_id], chunk[0].call_id, queue)
            if len(chunk) == 1
            else functools.partial(send_chunk, self.app, chunk, queue, self._signer)
            for chunk in plan.chunks
        ]

    def _room(self, queue: str, block: Duration | None) -> tuple[int, float] | None:
        """A capped queue's cap and how long to wait for room (``block``); None: no cap."""
        cap = self.settings.queue_cap(queue)
        if cap is None:
            return None
        return cap, time.monotonic() + (0.0 if block is None else seconds(block, "block"))

    def _idempotency(self, idempotency_key: str) -> tuple[str, int]:
        """The Redis key of an idempotency key, and its time to live in seconds."""
        key = self.settings.keys.idempotency(idempotency_key)
        return key, max(1, int(self.settings.idempotency_ttl_s))


def has_room(queue: str, length: int, needed: int, cap: int, deadline: float) -> bool:
    """Backpressure: True if ``needed`` more messages fit beside ``length`` under ``cap``;
    :class:`QueueFull` if not and ``deadline`` (``time.monotonic()``) passed, or if they
    never fit; False: look again after :data:`QUEUE_FULL_POLL_S`. Producers racing for
    the last places may overshoot the cap by their number."""
    if length + needed <= cap:
        return True
    if needed > cap or time.monotonic() >= deadline:
        raise QueueFull(queue, length, cap, needed)
    return False


def prepare_request(
    settings: Settings,
    tool_id: str,
    input: Any = None,
    env: Mapping[str, str] | None = None,
    timeout: Duration | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    max_attempts: int | None = None,
    retry: bool = True,
    priority: int | None = None,
    cache: bool = True,
    sealed_env: str | None = None,
    index: int | None = None,
) -> CallRequest:
    """One call's request, validated as a worker would (:class:`InvalidInput` otherwise):
    what ``ToolClient`` and ``AsyncToolClient`` send. ``index``: its place in a list of
    inputs, named in the error."""
    try:
        request = validate(
            new_request(
                tool_id,
                input,
                env,
                timeout,
                config=config,
                max_attempts=max_attempts,
                retry=retry,
                priority=priority,
                cache=cache,
            ),
            settings,
        )
    except InvalidInput as exc:
        if index is None:
            raise
        raise InvalidInput(f"input {index}: {exc.message}", exc.name) from None
    if sealed_env is not None:
        request = dataclasses.replace(request, env_sealed=sealed_env)
    return request


def to_result(value: Any, call_id: str, tool_id: str) -> ToolResult:
    """The envelope of a result Celery stored (a failed call's is in its exception)."""
    if isinstance(value, dict) and "status" in value:
        return ToolResult.from_dict(value)
    if isinstance(value, ToolCallFailed):  # a failed call: Celery state FAILURE
        return ToolResult.from_dict(value.envelope)
    # The task itself failed (it never should): report it as an envelope anyway.
    failure = (
        ToolTimeout(f"worker time limit: {value}", "TimeoutError")
        if isinstance(value, TimeLimitExceeded)
        else ToolCrashed(f"worker error: {value!r}", type(value).__name__)
    )
    return ToolResult.failed(call_id, tool_id, failure)


def seconds(value: Duration, name: str) -> float:
    """A caller's duration in seconds (:class:`InvalidInput` naming ``name`` otherwise)."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise InvalidInput(f"{name}: {exc}", "ValidationError") from None


def unavailable(url: str, cause: object) -> BrokerUnavailable:
    """The error both clients raise when Redis cannot be reached (the URL redacted)."""
    return BrokerUnavailable(f"cannot reach Redis at {redact_url(url)}: {cause}")


@contextlib.contextmanager
def redis_errors(url: str) -> Iterator[None]:
    """The synchronous client's one boundary where Celery's and redis-py's connection
    errors become toolq's."""
    try:
        yield
    except (OperationalError, RedisError, OSError) as exc:
        raise unavailable(url, exc) from exc
    except (BackendGetMetaError, BackendStoreError) as exc:  # the backend's retries ran out
        raise unavailable(url, exc.__cause__ or exc) from exc
    except RuntimeError as exc:  # Celery's result consumer gives up with a bare RuntimeError
        if isinstance(exc.__cause__, RedisError | OSError):
            raise unavailable(url, exc.__cause__) from exc
        raise
