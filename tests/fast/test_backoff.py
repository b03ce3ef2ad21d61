"""The retry policy as pure functions, over many seeds."""

from __future__ import annotations

import random

import pytest

from toolq.config.settings import Settings
from toolq.envelope import ToolErrorInfo
from toolq.workers.backoff import RetryPolicy, compute_delay, next_delay
from toolq.workers.profile import Profiles

POLICY = RetryPolicy(initial_interval_s=0.1, max_interval_s=2.0, max_elapsed_s=30.0)


@pytest.mark.parametrize("seed", range(50))
def test_delays_stay_within_jitter_and_the_cap(seed: int) -> None:
    rng = random.Random(seed)
    for attempt in range(1, 12):
        base = min(0.1 * 2 ** (attempt - 1), 2.0)
        delay = compute_delay(attempt, POLICY, rng)
        assert 0.5 * base <= delay <= min(1.5 * base, 2.0)


def test_without_jitter_delays_are_exact() -> None:
    policy = RetryPolicy(0.05, 1.0, 30.0, jitter=False)
    assert [compute_delay(n, policy) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]


def test_next_delay_stops_for_each_reason() -> None:
    failure = ToolErrorInfo("timeout", "too slow")

    def decide(attempt: int = 1, policy: RetryPolicy = POLICY, now: float = 0.0) -> object:
        return next_delay(attempt=attempt, error=failure, policy=policy, now=now, deadline=30.0)

    assert decide(attempt=5) == (None, "max_attempts")
    assert decide(policy=POLICY.overridden(enabled=False)) == (None, "disabled")
    assert decide(now=29.99) == (None, "deadline")
    assert decide()[1] is None


def test_profiles_resolve_tool_over_top_level_over_default() -> None:
    settings = Settings.model_validate(
        {
            "max_attempts": 4,
            "backoff_initial_interval": "50ms",
            "runtime": {"max_memory_mb": 512, "permissions": ["--allow-read"]},
            "tools": {
                "a": {"retry": {"max_attempts": 2}, "mode": "spawn"},
                "b": {"permissions": ["--allow-net"]},
            },
        }
    )
    profiles = Profiles(settings)
    default, a, b = profiles["other"], profiles["a"], profiles["b"]
    assert (default.retry.max_attempts, a.retry.max_attempts) == (4, 2)
    assert a.retry.initial_interval_s == default.retry.initial_interval_s == 0.05
    assert default.resources.max_memory_mb == 512
    assert (default.mode, a.mode, b.mode) == ("warm", "spawn", "spawn")
    assert b.permissions.net and not default.permissions.net
    assert profiles["a"] is a  # resolved once
