"""Durations as Compozy writes them (`30s`, `100ms`, `2m`, `1m30s`), in seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_TIME_LIMIT_S = 7 * 24 * 3600.0
"""The longest time limit a tool call may have (a week): bounded so that every derived
deadline fits the timers it is handed to (epoll, Celery, Redis expiries)."""
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def parse_duration(value: object) -> float:
    """Seconds for a duration string (Go syntax) or a bare number of seconds.

    Raises ``ValueError`` with a message fit for a config error.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 100ms or 2m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"duration must not be negative (got {value!r})")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"invalid duration {value!r}: use a number with a unit, e.g. 30s, 100ms, 2m"
                ) from None
    else:
        raise ValueError("expected a duration such as 30s, 100ms or 2m")
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be a finite number (got {value!r})")
    if seconds < 0:
        raise ValueError(f"duration must not be negative (got {value!r})")
    return seconds


def parse_time_limit(value: object) -> float:
    """A duration that may serve as a tool's time limit: at most :data:`MAX_TIME_LIMIT_S`."""
    seconds = parse_duration(value)
    if seconds > MAX_TIME_LIMIT_S:
        raise ValueError(
            f"time limit {format_duration(seconds)} is longer than the maximum of "
            f"{format_duration(MAX_TIME_LIMIT_S)}"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """Short human form: 50ms, 1.5s, 2m, 1h."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds < 60 or seconds % 60:
        return f"{seconds:g}s"
    if seconds < 3600 or seconds % 3600:
        return f"{seconds / 60:g}m"
    return f"{seconds / 3600:g}h"
