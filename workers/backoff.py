"""Retry policy as pure functions: how long to wait, and whether to try again at all.

Delays grow as ``initial * multiplier**(n-1)``, are capped at ``max_interval`` and,
with jitter on, are drawn uniformly from ±50 % of that (Compozy's Go backoff uses
the same randomisation factor), then capped again — so the cap always holds and
sub-second intervals mean what they say. ``max_elapsed`` is a deadline from the
call's first enqueue: no attempt is scheduled to start after it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

from toolq.envelope import ToolErrorInfo

JITTER = 0.5

StopReason = Literal["not_retryable", "disabled", "max_attempts", "deadline"]


@dataclass(frozen=True)
class RetryPolicy:
    initial_interval_s: float
    max_interval_s: float
    max_elapsed_s: float
    multiplier: float = 2.0
    max_attempts: int = 5
    jitter: bool = True
    non_retryable_errors: frozenset[str] = frozenset()
    retryable_errors: frozenset[str] = frozenset()
    """Names of thrown errors retried although they do not say ``retryable: true``."""
    enabled: bool = True

    def overridden(
        self, *, max_attempts: int | None = None, enabled: bool | None = None
    ) -> RetryPolicy:
        """The per-call overrides (``--max-attempts``, ``--no-retry``)."""
        policy = self
        if max_attempts is not None:
            policy = replace(policy, max_attempts=max_attempts)
        if enabled is not None:
            policy = replace(policy, enabled=enabled)
        return policy


def compute_delay(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    base = policy.initial_interval_s * policy.multiplier ** (attempt - 1)
    delay = min(base, policy.max_interval_s)
    if policy.jitter:
        delay *= (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return min(delay, policy.max_interval_s)


def is_retryable(error: ToolErrorInfo, policy: RetryPolicy) -> bool:
    """Whether this failure may be retried at all, whatever the budget: its kind or the
    thrown error says so (or its name is in ``retryable_errors``), and its name is not in
    ``non_retryable_errors``."""
    if error.name in policy.non_retryable_errors:
        return False
    return error.retryable or (error.kind == "tool_error" and error.name in policy.retryable_errors)


def next_delay(
    *,
    attempt: int,
    error: ToolErrorInfo,
    policy: RetryPolicy,
    now: float,
    deadline: float,
    rng: random.Random | None = None,
) -> tuple[float | None, StopReason | None]:
    """``(delay, None)`` to try again after ``delay`` seconds, or ``(None, why_not)``."""
    if not is_retryable(error, policy):
        return None, "not_retryable"
    if not policy.enabled:
        return None, "disabled"
    if attempt >= policy.max_attempts:
        return None, "max_attempts"
    delay = compute_delay(attempt, policy, rng)
    if now + delay > deadline:
        return None, "deadline"
    return delay, None
