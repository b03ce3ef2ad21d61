"""The call request: the one message format producers send and workers read.

{"tool_id", "input", "env", "enqueued_at",          # always
 "timeout"?,                                        # per-call soft limit, seconds
 "retry"?: {"max_attempts"?, "enabled"?},           # per-call retry overrides
 "attempt"?, "history"?}                            # added by workers on retries
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from toolq.config.durations import parse_duration
from toolq.errors import InvalidInput
from toolq.validation import check_input_size, validate_env, validate_tool_id

_INPUT_PREVIEW = 200


def build_request(
    tool_id: str,
    input: Any,
    env: Mapping[str, str] | None,
    timeout: float | str | None,
    *,
    max_attempts: int | None = None,
    retry: bool = True,
) -> dict[str, Any]:
    """A validated request; raises :class:`InvalidInput` for anything a worker would refuse."""
    validate_tool_id(tool_id)
    checked_env = validate_env(env)
    request: dict[str, Any] = {"tool_id": tool_id, "input": input, "env": checked_env}
    if timeout is not None:
        try:
            timeout_s = parse_duration(timeout)
        except ValueError as exc:
            raise InvalidInput(f"timeout: {exc}", "ValidationError") from None
        if timeout_s <= 0:
            raise InvalidInput("timeout must be positive", "ValidationError")
        request["timeout"] = timeout_s
    if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
        raise InvalidInput("max_attempts must be a positive integer", "ValidationError")
    overrides: dict[str, Any] = {}
    if max_attempts is not None:
        overrides["max_attempts"] = max_attempts
    if not retry:
        overrides["enabled"] = False
    if overrides:
        request["retry"] = overrides
    try:
        size = len(json.dumps(input, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"input is not JSON-serialisable: {exc}", "ParseError") from None
    check_input_size(size)
    request["enqueued_at"] = time.time()
    return request


def describe(request: Mapping[str, Any]) -> str:
    """What Flower and Celery's logs show: the tool id, a short input, env values hidden."""
    shown = json.dumps(request.get("input"), separators=(",", ":"), default=str)
    if len(shown) > _INPUT_PREVIEW:
        shown = shown[:_INPUT_PREVIEW] + "…"
    env = {key: "***" for key in request.get("env") or {}}
    attempt = request.get("attempt")
    suffix = f", attempt={attempt}" if attempt else ""
    return f"({request.get('tool_id')!r}, input={shown}, env={env}{suffix})"
