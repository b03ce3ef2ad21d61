"""A worker's health file, for container probes that cost nothing per call.

``toolq worker --health-file PATH`` writes a small JSON file (atomically: a temporary
file renamed over it) each time Celery sends its worker heartbeat (every 2 s, from the
consumer's event loop: a worker whose loop is wedged, stopped or starved writes no
more), once when it is ready to take calls, and once when it starts its warm
shutdown (``stopping``, with the time its drain may take). ``toolq health --file PATH``
reads it: no Redis, no broadcast to the fleet, no Celery import.

- liveness (``toolq health``): the last heartbeat is at most ``max_age`` old; while
  stopping, live until the drain's deadline (the pod is going away anyway; a restart
  would kill the calls it is finishing);
- readiness (``toolq health --ready``): live, ready, and not stopping.

A broker outage stops Celery's heartbeats too (the consumer reconnects): give the
liveness probe a window longer than the outages you want to ride out (the shipped
manifests: 2 minutes) — calls are acknowledged late, so a restart loses none.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the probe (check) runs without loading the settings model
    from toolq.config.settings import Settings

State = Literal["starting", "ready", "stopping"]
DEFAULT_MAX_AGE_S = 30.0
"""Liveness fails when the last heartbeat is older than this (Celery beats every 2 s)."""


def drain_budget_s(settings: Settings) -> float:
    """How long a warm shutdown may take: the longest hard limit a running call may
    reach, plus the backstop margin (``BACKSTOP_MARGIN_S``, 10 s: the last result
    written, the Bun processes closed, the presence entries removed). A container's
    grace period must be at least this (the Kubernetes manifests'
    ``terminationGracePeriodSeconds``); a chunk starts no call once its worker is
    stopping (the rest goes back on the queue)."""
    from toolq.config.settings import BACKSTOP_MARGIN_S  # loaded with ``settings``

    return settings.max_hard_timeout_s + BACKSTOP_MARGIN_S


@dataclass(frozen=True)
class Health:
    state: State
    at: float
    """Wall-clock time of the last write (a heartbeat, ready or stopping)."""
    pid: int
    drain_until: float | None = None


class HealthFile:
    """The worker's side: :meth:`write` on each heartbeat and state change."""

    def __init__(self, path: Path, drain_s: float) -> None:
        self.path = path
        self.drain_s = drain_s
        self.state: State = "starting"
        self._drain_until: float | None = None
        path.parent.mkdir(parents=True, exist_ok=True)

    def beat(self) -> None:
        self.write(self.state)

    def ready(self) -> None:
        if self.state == "starting":
            self.write("ready")

    def stopping(self) -> None:
        if self.state != "stopping":
            self._drain_until = time.time() + self.drain_s
            self.write("stopping")

    def write(self, state: State) -> None:
        self.state = state
        record = {"state": state, "at": time.time(), "pid": os.getpid()}
        if self._drain_until is not None:
            record["drain_until"] = self._drain_until
        fd, tmp = tempfile.mkstemp(prefix=".health-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(record, out)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def read_health(path: Path) -> Health:
    """The file's content; OSError / ValueError when it is missing or not a health file."""
    record = json.loads(path.read_text())
    state = record.get("state")
    if state not in ("starting", "ready", "stopping"):
        raise ValueError(f"not a toolq health file: state {state!r}")
    until = record.get("drain_until")
    return Health(
        state, float(record["at"]), int(record["pid"]), None if until is None else float(until)
    )


def check(
    path: Path,
    *,
    ready: bool = False,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    now: float | None = None,
) -> str | None:
    """None when the worker behind ``path`` is live (and, with ``ready``, ready), else
    why not, in words."""
    now = time.time() if now is None else now
    try:
        health = read_health(path)
    except FileNotFoundError:
        return (
            f"no health file at {path} (the worker has not started, or runs without --health-file)"
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"cannot read health file {path}: {exc}"
    age = now - health.at
    if health.state == "stopping":
        if ready:
            return "the worker is stopping (draining its running calls)"
        if health.drain_until is not None and now <= health.drain_until:
            return None
        return (
            f"the worker has been stopping past its drain deadline ({age:.0f}s since the last beat)"
        )
    if age > max_age_s:
        return (
            f"last heartbeat {age:.0f}s ago (more than {max_age_s:g}s): the worker is wedged, "
            "stopped or cut off from Redis"
        )
    if ready and health.state != "ready":
        return "the worker is still starting"
    return None
