"""The call contract: one validation for producer and worker, one message codec.

No Redis, no Bun: these run in milliseconds (``make test-fast``).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from toolq import InvalidInput, ToolClient
from toolq.config.settings import Settings
from toolq.protocol import CallRequest, new_request, validate


@pytest.fixture
def settings() -> Settings:
    return Settings.model_validate(
        {"runtime": {"timeout": "10s"}, "tools": {"slow": {"timeout": "60s"}}}
    )


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_message_round_trip_keeps_every_field(settings: Settings) -> None:
    request = validate(
        new_request("echo", {"a": [1, 2]}, {"KEY": "v"}, "2s", max_attempts=3, retry=False),
        settings,
    )
    retried = request.next_attempt({"kind": "tool_error", "message": "boom"})
    decoded = CallRequest.from_message(retried.to_message())
    assert decoded == retried
    assert decoded.attempt == 2 and decoded.history[0]["kind"] == "tool_error"
    assert (decoded.timeout_s, decoded.max_attempts, decoded.retry) == (2.0, 3, False)


def test_a_first_attempt_message_stays_minimal(settings: Settings) -> None:
    message = validate(new_request("echo", {}), settings).to_message()
    assert set(message) == {"tool_id", "input", "env", "enqueued_at"}


def test_describe_hides_env_values(settings: Settings) -> None:
    shown = validate(new_request("echo", {"x": 1}, {"API_KEY": "s3cret"}), settings).describe()
    assert "s3cret" not in shown and "API_KEY" in shown


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"tool_id": "echo\n"}, "invalid tool id"),
        ({"tool_id": "../etc"}, "invalid tool id"),
        ({"timeout": "nan"}, "finite"),
        ({"timeout": math.inf}, "finite"),
        ({"timeout": -1}, "negative"),
        ({"timeout": "0s"}, "outside"),
        ({"timeout": "66s"}, "outside"),  # above the longest hard limit (60s + 5s)
        ({"timeout": True}, "expected a duration"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"input": {"x": float("nan")}}, "JSON"),
        ({"input": {"x": {1, 2}}}, "JSON"),
        ({"input": deep(101)}, "nests deeper"),
        ({"input": deep(100_000)}, "nests deeper"),
        ({"input": {"data": "x" * (10 * 1024 * 1024 + 1)}}, "over the limit"),
        ({"env": {"lower": "x"}}, "env name"),
        ({"env": {"KEY": "a\nb"}}, "CR, LF"),
    ],
)
def test_validate_refuses(settings: Settings, kwargs: dict[str, Any], reason: str) -> None:
    arguments = {"tool_id": "echo", "input": {}, **kwargs}
    with pytest.raises(InvalidInput, match=reason):
        validate(new_request(**arguments), settings)


def test_validate_accepts_the_edges(settings: Settings) -> None:
    assert validate(new_request("slow", {}, timeout="65s"), settings).timeout_s == 65
    assert validate(new_request("echo", deep(99)), settings).input == deep(99)


@pytest.mark.parametrize(
    "message",
    [
        None,
        [],
        "echo",
        {"tool_id": "echo", "retry": []},
        {"tool_id": "echo", "retry": {"enabled": "no"}},
        {"tool_id": "echo", "attempt": 0},
        {"tool_id": "echo", "attempt": "2"},
        {"tool_id": "echo", "history": {}},
        {"tool_id": "echo", "enqueued_at": "yesterday"},
    ],
)
def test_messages_that_are_not_calls(message: Any) -> None:
    with pytest.raises(InvalidInput):
        CallRequest.from_message(message)


def test_the_client_refuses_what_a_worker_would_before_touching_redis() -> None:
    # Nothing listens on port 1: reaching Redis would raise BrokerUnavailable instead.
    settings = Settings.model_validate({"redis_url": "redis://127.0.0.1:1/0"})
    with ToolClient(settings) as client:
        with pytest.raises(InvalidInput, match="outside"):
            client.enqueue("echo", {}, timeout="1h")
        with pytest.raises(InvalidInput, match="invalid tool id"):
            client.enqueue("echo\n", {})
        with pytest.raises(InvalidInput, match="negative"):
            client.call("some-id").result(timeout="-5s")
