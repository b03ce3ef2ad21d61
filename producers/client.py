"""The producer API for application code: enqueue tool calls, wait for their results.

    from toolq import ToolClient

    client = ToolClient()                      # settings from compozy.yaml / TOOLQ_*
    call = client.enqueue("weather", {"city": "Lisbon"})
    print(call.result(timeout=30).result)
    client.run("weather", {"city": "Oslo"})    # enqueue and wait
    client.map("weather", [{"city": c} for c in cities])   # in chunks: see enqueue_many

Bad calls (an invalid tool id or env, input that is not JSON or is too big) raise
:class:`~toolq.errors.InvalidInput` here, before anything is enqueued.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import redis
from celery import Celery, states
from celery.exceptions import BackendGetMetaError, BackendStoreError, TimeLimitExceeded
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from toolq.config.celery_app import make_celery, queue_lists, send_call, send_chunk
from toolq.config.connections import close_redis, redis_client
from toolq.config.durations import parse_duration
from toolq.config.loader import load_settings
from toolq.config.settings import Settings, redact_url
from toolq.envelope import ToolResult
from toolq.errors import (
    BrokerUnavailable,
    InvalidInput,
    QueueFull,
    ResultTimeout,
    ToolCallFailed,
    ToolCrashed,
    ToolTimeout,
)
from toolq.presence import QueueWatch, unserved_warning
from toolq.producers import idempotency
from toolq.producers.cancel import CancelOutcome, cancel_call
from toolq.producers.collect import collect
from toolq.protocol import MAX_CHUNK_CALLS, CallRequest, ChunkEntry, new_request, validate
from toolq.sealing import load_sealer
from toolq.signing import load_signer

log = logging.getLogger("toolq.producer")
QUEUE_FULL_POLL_S = 0.05
"""How often ``enqueue(block=...)`` looks again at a full queue."""

MAX_AUTO_CHUNK = 100
"""The most calls a chunk holds unless ``chunk_size`` says otherwise."""
MIN_CHUNKS = 16
"""A short list is cut into at least this many chunks (of one call, at the least), so
that its calls spread over several workers' slots."""
CHUNK_MAX_BYTES = 1024 * 1024
"""A chunk message holds at most this much of calls (a bigger call goes alone)."""

T = TypeVar("T")
Duration = float | str
"""Seconds, or a duration string such as ``"30s"`` or ``"500ms"``."""
_REFUSED_RETRY_S = 0.2
"""How often enqueue tries again while Redis refuses connections (within the timeout)."""
_OUTAGE_POLL_S = 0.5
"""How often a caller waiting for a result tries Redis again while it is away."""


@contextlib.contextmanager
def _redis_errors(url: str) -> Iterator[None]:
    """The one boundary where Celery's and redis-py's connection errors become toolq's."""
    try:
        yield
    except (OperationalError, RedisError, OSError) as exc:
        raise BrokerUnavailable(f"cannot reach Redis at {redact_url(url)}: {exc}") from exc
    except (BackendGetMetaError, BackendStoreError) as exc:  # the backend's retries ran out
        raise BrokerUnavailable(
            f"cannot reach Redis at {redact_url(url)}: {exc.__cause__ or exc}"
        ) from exc
    except RuntimeError as exc:  # Celery's result consumer gives up with a bare RuntimeError
        if isinstance(exc.__cause__, RedisError | OSError):
            raise BrokerUnavailable(
                f"cannot reach Redis at {redact_url(url)}: {exc.__cause__}"
            ) from exc
        raise


def _subscribe_on_wait(app: Celery) -> None:
    """Subscribe to a call's result when someone waits for it, not at enqueue.

    Celery's Redis backend subscribes at ``send_task``; ``result()`` subscribes anyway
    and then reads the stored state, so nothing is missed. Without it an enqueue opens
    one connection, not two — a hung Redis costs it one socket timeout — and a
    fire-and-forget call holds no subscription. (``app.backend`` is per thread.)
    """
    backend: Any = app.backend
    if not getattr(backend, "_toolq_subscribe_on_wait", False):
        backend.on_task_call = lambda *args, **kwargs: None
        backend._toolq_subscribe_on_wait = True


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
        with _redis_errors(self._url):
            return bool(self._async.ready())

    def state(self) -> str:
        """Celery's view: PENDING (queued or unknown), STARTED, SUCCESS or FAILURE."""
        with _redis_errors(self._url):
            return str(self._async.state)

    def result(self, timeout: Duration | None = None) -> ToolResult:
        """Wait for the call to finish; raise :class:`ResultTimeout` after ``timeout``.

        Celery's result drainer checks the deadline about once a second, so a
        sub-second ``timeout`` may wait up to a second. A Redis outage shorter than
        ``timeout`` is ridden out; a longer one raises :class:`BrokerUnavailable` at the
        deadline.
        """
        wait_s = None if timeout is None else _seconds(timeout, "timeout")
        deadline = None if wait_s is None else time.monotonic() + wait_s
        try:
            with _redis_errors(self._url):
                value = self._async.get(timeout=wait_s, propagate=False, interval=0.05)
        except CeleryTimeoutError:
            self._stop_waiting()
            raise ResultTimeout(self.id, wait_s or 0.0) from None
        except BrokerUnavailable as lost:
            value = self._through_outage(lost, deadline, wait_s or 0.0)
        return _to_result(value, self.id, self.tool_id)

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
                with _redis_errors(self._url):
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
        with _redis_errors(self._url):
            self._async.forget()


class ToolClient:
    """Enqueues tool calls to Redis for toolq workers; one per application is enough."""

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
        self.app: Celery = make_celery(settings, name="toolq-producer")
        self._redis_client: redis.Redis | None = None
        self._warned_queues: set[str] = set()
        self._watch = QueueWatch(lambda: self._redis)

    def enqueue(
        self,
        tool_id: str,
        input: Any = None,
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        max_attempts: int | None = None,
        retry: bool = True,
        idempotency_key: str | None = None,
        sealed_env: str | None = None,
        priority: int | None = None,
        cache: bool = True,
        block: Duration | None = None,
    ) -> ToolCall:
        """Put one call on the queue and return at once.

        ``priority`` 0 (default) .. 9: a worker takes more urgent calls of its queues
        first. ``cache=False`` runs the tool even if its result cache has an answer.
        A queue at its ``max_queue_length`` raises :class:`QueueFull`, or with ``block``
        waits up to that long for room first.

        ``config`` overrides the tool's configured ``config`` (its second argument) key
        by key. Input that breaks the tool's input schema raises :class:`InvalidInput`
        here, naming the field. ``max_attempts`` and ``retry=False`` override the retry
        policy for this call.
        With ``idempotency_key``, enqueueing again under the same key within
        ``idempotency_ttl`` returns the first call (and so its result) instead of
        running the tool twice. ``sealed_env``: an env already sealed (a dead letter's),
        passed on unopened for the worker to open.
        """
        request = prepare_request(
            self.settings,
            tool_id,
            input,
            env,
            timeout,
            config=config,
            max_attempts=max_attempts,
            retry=retry,
            priority=priority,
            cache=cache,
            sealed_env=sealed_env,
        )
        call_id = str(uuid.uuid4())
        queue = self._queue(tool_id, queue)
        self._make_room(queue, block)
        if idempotency_key is not None:
            first = self._claim(idempotency_key, call_id, request)
            if first is not None:
                return self.call(first, tool_id)
        try:
            async_result = self._send(request, call_id, queue)
        except BrokerUnavailable:
            if idempotency_key is not None:  # do not leave the key pointing at nothing
                with contextlib.suppress(RedisError):
                    self._redis.delete(self.settings.keys.idempotency(idempotency_key))
            raise
        return ToolCall(call_id, tool_id, async_result, self.settings.redis_url, self)

    def _queue(self, tool_id: str, queue: str | None) -> str:
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
        if self._watch.newly_unserved(queue):  # one ZCOUNT per queue per few seconds
            log.warning("%s", unserved_warning(self.settings, queue))
        return queue

    def queue_length(self, queue: str) -> int:
        """Calls waiting in ``queue`` (all priorities; not those a worker holds)."""
        with _redis_errors(self.settings.redis_url), self._redis.pipeline() as pipe:
            for name in queue_lists(queue):
                pipe.llen(name)
            return sum(int(n) for n in pipe.execute())

    def _make_room(self, queue: str, block: Duration | None, needed: int = 1) -> None:
        """Backpressure: one look at the queue's length when it has a cap (none otherwise),
        for room for ``needed`` messages at once. Producers racing for the last places may
        overshoot the cap by their number."""
        cap = self.settings.queue_cap(queue)
        if cap is None:
            return
        deadline = time.monotonic() + (0.0 if block is None else _seconds(block, "block"))
        while (length := self.queue_length(queue)) + needed > cap:
            if needed > cap or time.monotonic() >= deadline:  # (more than the cap: never)
                raise QueueFull(queue, length, cap, needed)
            time.sleep(QUEUE_FULL_POLL_S)

    def cancel(self, call_id: str, tool_id: str = "") -> CancelOutcome:
        """Cancel a call by id (see :meth:`ToolCall.cancel`)."""
        with _redis_errors(self.settings.redis_url):
            return cancel_call(self._redis, self.app, self.settings.keys, call_id, tool_id)

    def _send(self, request: CallRequest, call_id: str, queue: str) -> AsyncResult:
        _subscribe_on_wait(self.app)
        return self._publish(
            lambda: send_call(
                self.app, request, call_id, queue, self._sealer, signer=self._signer, retry=False
            )
        )

    def _publish(self, send: Callable[[], T]) -> T:
        """Publish once per try, within ``redis_socket_timeout`` in all: a refused
        connection (a restart) is tried again until then; a hung Redis is not waited
        for twice (Celery's own publish retries would wait 4-5 socket timeouts)."""
        deadline = time.monotonic() + self.settings.redis_socket_timeout_s
        while True:
            try:
                with _redis_errors(self.settings.redis_url):
                    return send()
            except BrokerUnavailable:
                if time.monotonic() + _REFUSED_RETRY_S >= deadline:
                    raise
                time.sleep(_REFUSED_RETRY_S)

    def run(
        self,
        tool_id: str,
        input: Any = None,
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        wait: Duration | None = None,
        max_attempts: int | None = None,
        retry: bool = True,
        idempotency_key: str | None = None,
        priority: int | None = None,
        cache: bool = True,
        block: Duration | None = None,
    ) -> ToolResult:
        """Enqueue and wait. ``timeout`` limits the tool; ``wait`` limits the waiting."""
        call = self.enqueue(
            tool_id,
            input,
            env,
            timeout,
            queue,
            config=config,
            max_attempts=max_attempts,
            retry=retry,
            idempotency_key=idempotency_key,
            priority=priority,
            cache=cache,
            block=block,
        )
        return call.result(timeout=wait)

    def enqueue_many(
        self,
        tool_id: str,
        inputs: Iterable[Any],
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        max_attempts: int | None = None,
        retry: bool = True,
        priority: int | None = None,
        cache: bool = True,
        block: Duration | None = None,
        chunk_size: int | None = None,
    ) -> list[ToolCall]:
        """Enqueue one call per input, ``chunk_size`` calls per message; return at once.

        Every call keeps its own id, result, retries, breaker accounting and dead letter;
        a chunk is one message to Celery (and Flower), run over a worker's free slots.
        ``chunk_size`` 1 sends each call alone; by default a chunk holds up to
        :data:`MAX_AUTO_CHUNK` calls, smaller for short lists so that at least
        :data:`MIN_CHUNKS` messages spread over the workers. Every input is validated
        before anything is sent (:class:`InvalidInput` names the first bad one). A chunk
        counts as one message towards ``max_queue_length``; on a capped queue all chunks
        are sent or none: :class:`QueueFull` (after ``block``) means nothing was enqueued,
        also when the chunks outnumber the cap. If Redis goes away part-way,
        :class:`BrokerUnavailable` is raised and the chunks already sent still run.
        """
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
        plan = plan_chunks(requests, self._sealer, chunk_size)
        queue = self._queue(tool_id, queue)
        self._make_room(queue, block, len(plan.chunks))  # all or nothing: room for every chunk
        for chunk in plan.chunks:
            if len(chunk) == 1:  # a call alone is sent as a single call
                self._send(plan.requests[chunk[0].call_id], chunk[0].call_id, queue)
            else:
                self._publish(functools.partial(send_chunk, self.app, chunk, queue, self._signer))
        return [self.call(call_id, tool_id) for call_id in plan.requests]

    def gather(self, calls: Sequence[ToolCall], wait: Duration | None = None) -> list[ToolResult]:
        """Wait for every call (in one subscription, not one per call); results in the
        calls' order. :class:`ResultTimeout` names the first call not done by ``wait``."""
        wait_s = None if wait is None else _seconds(wait, "wait")
        deadline = None if wait_s is None else time.monotonic() + wait_s
        ids = [call.id for call in calls]
        with _redis_errors(self.settings.redis_url):
            values = collect(self.app, self._redis, ids, deadline)
        missing = [call for call in calls if call.id not in values]
        if missing:
            raise ResultTimeout(missing[0].id, wait_s or 0.0)
        return [_to_result(values[call.id], call.id, call.tool_id) for call in calls]

    def map(
        self,
        tool_id: str,
        inputs: Iterable[Any],
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        wait: Duration | None = None,
        max_attempts: int | None = None,
        retry: bool = True,
        priority: int | None = None,
        cache: bool = True,
        block: Duration | None = None,
        chunk_size: int | None = None,
    ) -> list[ToolResult]:
        """Run one call per input, in chunks across workers; results in input order
        (:meth:`enqueue_many`, then :meth:`gather`)."""
        calls = self.enqueue_many(
            tool_id,
            inputs,
            env,
            timeout,
            queue,
            config=config,
            max_attempts=max_attempts,
            retry=retry,
            priority=priority,
            cache=cache,
            block=block,
            chunk_size=chunk_size,
        )
        return self.gather(calls, wait)

    def call(self, call_id: str, tool_id: str = "") -> ToolCall:
        """A handle on a call enqueued earlier (by id)."""
        return ToolCall(
            call_id, tool_id, AsyncResult(call_id, app=self.app), self.settings.redis_url, self
        )

    def close(self) -> None:
        self.app.close()
        if self._redis_client is not None:
            close_redis(self._redis_client)

    @property
    def _redis(self) -> redis.Redis:
        if self._redis_client is None:
            self._redis_client = redis_client(self.settings)
        return self._redis_client

    def _claim(self, idempotency_key: str, call_id: str, request: CallRequest) -> str | None:
        """Reserve the key for ``call_id``; return the earlier call's id if there is one
        for the same request (:mod:`toolq.producers.idempotency`; another is refused)."""
        key = self.settings.keys.idempotency(idempotency_key)
        ttl = max(1, int(self.settings.idempotency_ttl_s))
        with _redis_errors(self.settings.redis_url):
            return idempotency.claim(self._redis, key, idempotency_key, call_id, request, ttl)

    def __enter__(self) -> ToolClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _to_result(value: Any, call_id: str, tool_id: str) -> ToolResult:
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


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Calls cut into chunk messages (:func:`plan_chunks`)."""

    chunks: list[list[ChunkEntry]]
    requests: dict[str, CallRequest]
    """Each call's request by its new call id, in input order."""


def plan_chunks(requests: Sequence[CallRequest], sealer: Any, chunk_size: int | None) -> ChunkPlan:
    """Give each request a call id and cut them into chunks of ``chunk_size`` calls (by
    default up to :data:`MAX_AUTO_CHUNK`, fewer for short lists so that at least
    :data:`MIN_CHUNKS` messages spread over the workers), ``CHUNK_MAX_BYTES`` at most."""
    if chunk_size is not None and not 1 <= chunk_size <= MAX_CHUNK_CALLS:
        raise InvalidInput(f"chunk_size must be 1 to {MAX_CHUNK_CALLS}", "ValidationError")
    size = chunk_size or min(MAX_AUTO_CHUNK, max(1, -(-len(requests) // MIN_CHUNKS)))
    entries, by_id = [], {}
    for request in requests:
        message = request.to_message(sealer)
        nbytes = len(json.dumps(message, separators=(",", ":"), default=str))
        entry = ChunkEntry(str(uuid.uuid4()), message)
        entries.append((entry, nbytes))
        by_id[entry.call_id] = request
    return ChunkPlan(list(_chunks(entries, size, CHUNK_MAX_BYTES)), by_id)


def _chunks(
    entries: list[tuple[ChunkEntry, int]], size: int, max_bytes: int
) -> Iterator[list[ChunkEntry]]:
    """Calls grouped ``size`` at a time, and never more than ``max_bytes`` of messages
    in one (a call bigger than that goes alone)."""
    chunk: list[ChunkEntry] = []
    used = 0
    for entry, nbytes in entries:
        if chunk and (len(chunk) >= size or used + nbytes > max_bytes):
            yield chunk
            chunk, used = [], 0
        chunk.append(entry)
        used += nbytes
    if chunk:
        yield chunk


def _seconds(value: Duration, name: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise InvalidInput(f"{name}: {exc}", "ValidationError") from None
