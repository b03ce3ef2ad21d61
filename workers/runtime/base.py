"""The seam between call handling and Bun: a :class:`Runtime` runs a :class:`Call`
and returns an :class:`Outcome`, whatever happened.

Two runtimes implement it — :mod:`.spawn` (a fresh Bun per call) and :mod:`.warm`
(long-lived Bun processes) — and :class:`.routing.ByMode` picks one per call. Policy
tests implement it with a fake, so retry and breaker decisions run without Bun.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from toolq.config.settings import TimeLimits
from toolq.envelope import ToolErrorInfo
from toolq.errors import ToolFailure
from toolq.workers.runtime.limits import ResourceLimits
from toolq.workers.runtime.sandbox import Permissions

Mode = Literal["warm", "spawn"]

DEFAULT_RESOURCES = ResourceLimits(
    max_memory_mb=2048, max_processes=256, max_open_files=1024, max_cpu_time_s=None
)


_CANCEL_LOCK = threading.Lock()
"""Shared by every token: cancelling is rare, creating a token is not."""
_SPARE_FDS: list[int] = []
"""Eventfds of closed tokens that were never set, for the next tokens: a call's token
costs no syscall (an eventfd and a close per call, each a GIL hand-off on the reply path)."""
_MAX_SPARE = 64


class CancelToken:
    """Set once to ask the runtime to stop a running call (``toolq cancel``).

    Selectable (an eventfd), so the pump wakes the moment it is set and a call that is
    never cancelled costs no polling. A closed token is never set again (``cancel`` after
    ``close`` does nothing), so its eventfd, if it was never set, serves a later token."""

    def __init__(self) -> None:
        with _CANCEL_LOCK:
            fd = _SPARE_FDS.pop() if _SPARE_FDS else -1
        self._fd = fd if fd >= 0 else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cancelled = False  # a flag, not an Event: every call makes a token

    def cancel(self) -> None:
        with _CANCEL_LOCK:
            if self._cancelled or self._fd < 0:
                return
            self._cancelled = True
            os.eventfd_write(self._fd, 1)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        with _CANCEL_LOCK:
            fd, self._fd = self._fd, -1
            if fd < 0:
                return
            if not self._cancelled and len(_SPARE_FDS) < _MAX_SPARE:
                _SPARE_FDS.append(fd)  # never written: as good as a new one
                return
        os.close(fd)


@dataclass(frozen=True)
class Call:
    """One tool run, validated, with its effective limits and permissions."""

    tool_id: str
    tool_exec_id: str
    input: Any
    env: Mapping[str, str]
    time_limits: TimeLimits
    config: Mapping[str, Any] = field(default_factory=dict)
    permissions: Permissions = field(default_factory=Permissions)
    resources: ResourceLimits = DEFAULT_RESOURCES
    mode: Mode = "spawn"
    cancel: CancelToken | None = field(default=None, compare=False)
    """Set while the call runs to stop it: SIGTERM, SIGKILL after the grace period."""


@dataclass(frozen=True)
class Outcome:
    """What one run produced: a normalised result or an error, and how it went."""

    result: dict[str, Any] | None
    error: ToolErrorInfo | None
    execution_time_ms: int
    total_time_ms: int
    output_bytes: int = 0
    exit_code: int | None = None
    exit_signal: str | None = None
    stderr: str = ""
    exiting: bool = False
    """The wrapper said it is exiting (a late error): a warm process must not be reused."""
    launched_ns: tuple[int, int] | None = None
    """When the Bun process this call waited for was launched (epoch ns, start and end):
    spawn mode without a process started ahead; None otherwise (tracing's toolq.spawn)."""

    @property
    def kind(self) -> str | None:
        """The error kind, or None for a success."""
        return self.error.kind if self.error is not None else None


class Runtime(Protocol):
    """Runs calls; thread-safe; never raises for a tool's failure (that is an Outcome)."""

    def run(self, call: Call) -> Outcome: ...

    def close(self) -> None: ...


def failed(failure: ToolFailure, started: float | None = None) -> Outcome:
    """The outcome of a call that ended before (or without) a Bun run."""
    elapsed = 0 if started is None else int((time.monotonic() - started) * 1000)
    return Outcome(None, ToolErrorInfo.from_failure(failure), elapsed, elapsed)
