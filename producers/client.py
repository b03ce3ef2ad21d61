"""The producer API for application code: enqueue tool calls, wait for their results.

    from toolq import ToolClient

    client = ToolClient()                      # settings from compozy.yaml / TOOLQ_*
    call = client.enqueue("weather", {"city": "Lisbon"})
    print(call.result(timeout=30).result)
    client.run("weather", {"city": "Oslo"})    # enqueue and wait
    client.map("weather", [{"city": c} for c in cities])

Bad calls (an invalid tool id or env, input that is not JSON or is too big) raise
:class:`~toolq.errors.InvalidInput` here, before anything is enqueued.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from celery import Celery
from celery.exceptions import TimeLimitExceeded
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from toolq.config.celery_app import RUN_TOOL_TASK, make_celery
from toolq.config.durations import parse_duration
from toolq.config.loader import load_settings
from toolq.config.settings import Settings, redact_url
from toolq.envelope import ToolErrorInfo, ToolResult
from toolq.errors import BrokerUnavailable, InvalidInput, ResultTimeout, ToolCrashed, ToolTimeout
from toolq.validation import check_input_size, validate_env, validate_tool_id

Duration = float | str
"""Seconds, or a duration string such as ``"30s"`` or ``"500ms"``."""

_REDACTED = "***"
_INPUT_PREVIEW = 200


@contextlib.contextmanager
def _redis_errors(url: str) -> Iterator[None]:
    """The one boundary where Celery's and redis-py's connection errors become toolq's."""
    try:
        yield
    except (OperationalError, RedisError, OSError) as exc:
        raise BrokerUnavailable(f"cannot reach Redis at {redact_url(url)}: {exc}") from exc
    except RuntimeError as exc:  # Celery's result consumer gives up with a bare RuntimeError
        if isinstance(exc.__cause__, RedisError | OSError):
            raise BrokerUnavailable(
                f"cannot reach Redis at {redact_url(url)}: {exc.__cause__}"
            ) from exc
        raise


class ToolCall:
    """A handle on an enqueued call. ``id`` is stable; ``result()`` waits for the envelope."""

    def __init__(self, call_id: str, tool_id: str, async_result: AsyncResult, url: str) -> None:
        self.id = call_id
        self.tool_id = tool_id
        self._async = async_result
        self._url = url

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
        sub-second ``timeout`` may wait up to a second.
        """
        wait_s = None if timeout is None else parse_duration(timeout)
        try:
            with _redis_errors(self._url):
                value = self._async.get(timeout=wait_s, propagate=False, interval=0.05)
        except CeleryTimeoutError:
            raise ResultTimeout(self.id, wait_s or 0.0) from None
        if isinstance(value, dict) and "status" in value:
            return ToolResult.from_dict(value)
        # The task itself failed (it never should): report it as an envelope anyway.
        failure = (
            ToolTimeout(f"worker time limit: {value}", "TimeoutError")
            if isinstance(value, TimeLimitExceeded)
            else ToolCrashed(f"worker error: {value!r}", type(value).__name__)
        )
        return ToolResult(
            self.id,
            self.tool_id,
            error=ToolErrorInfo.from_failure(failure),
            metadata={"tool_exec_id": self.id, "attempts": 1, "execution_time": 0},
        )

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
        self.app: Celery = make_celery(settings, name="toolq-producer")

    def enqueue(
        self,
        tool_id: str,
        input: Any = None,
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
    ) -> ToolCall:
        """Put one call on the queue and return at once."""
        request = self._request(tool_id, input, env, timeout)
        call_id = str(uuid.uuid4())
        with _redis_errors(self.settings.redis_url):
            async_result = self.app.send_task(
                RUN_TOOL_TASK,
                args=[request],
                task_id=call_id,
                queue=queue or self.settings.queue,
                argsrepr=_args_repr(request),
                kwargsrepr="{}",
                headers={"toolq_tool_id": tool_id},  # for Flower and the logs
            )
        return ToolCall(call_id, tool_id, async_result, self.settings.redis_url)

    def run(
        self,
        tool_id: str,
        input: Any = None,
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        wait: Duration | None = None,
    ) -> ToolResult:
        """Enqueue and wait. ``timeout`` limits the tool; ``wait`` limits the waiting."""
        return self.enqueue(tool_id, input, env, timeout, queue).result(timeout=wait)

    def map(
        self,
        tool_id: str,
        inputs: Iterable[Any],
        env: Mapping[str, str] | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        wait: Duration | None = None,
    ) -> list[ToolResult]:
        """Run one call per input, in parallel across workers; results in input order."""
        calls = [self.enqueue(tool_id, item, env, timeout, queue) for item in inputs]
        deadline = None if wait is None else time.monotonic() + parse_duration(wait)
        results = []
        for call in calls:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            results.append(call.result(timeout=remaining))
        return results

    def call(self, call_id: str, tool_id: str = "") -> ToolCall:
        """A handle on a call enqueued earlier (by id)."""
        return ToolCall(
            call_id, tool_id, AsyncResult(call_id, app=self.app), self.settings.redis_url
        )

    def close(self) -> None:
        self.app.close()

    def __enter__(self) -> ToolClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(
        self,
        tool_id: str,
        input: Any,
        env: Mapping[str, str] | None,
        timeout: Duration | None,
    ) -> dict[str, Any]:
        validate_tool_id(tool_id)
        checked_env = validate_env(env)
        timeout_s = None
        if timeout is not None:
            try:
                timeout_s = parse_duration(timeout)
            except ValueError as exc:
                raise InvalidInput(f"timeout: {exc}", "ValidationError") from None
            if timeout_s <= 0:
                raise InvalidInput("timeout must be positive", "ValidationError")
        try:
            size = len(json.dumps(input, separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"input is not JSON-serialisable: {exc}", "ParseError") from None
        check_input_size(size)
        request: dict[str, Any] = {
            "tool_id": tool_id,
            "input": input,
            "env": checked_env,
            "enqueued_at": time.time(),
        }
        if timeout_s is not None:
            request["timeout"] = timeout_s
        return request


def _args_repr(request: Mapping[str, Any]) -> str:
    """What Flower and Celery's logs show: the tool id, a short input, env values hidden."""
    shown = json.dumps(request.get("input"), separators=(",", ":"))
    if len(shown) > _INPUT_PREVIEW:
        shown = shown[:_INPUT_PREVIEW] + "…"
    env = {key: _REDACTED for key in request.get("env") or {}}
    return f"({request['tool_id']!r}, input={shown}, env={env})"
