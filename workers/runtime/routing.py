"""One runtime per mode behind one :class:`Runtime`, sharing the worker's slots."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from toolq.errors import ToolCrashed
from toolq.workers.runtime.base import Call, Mode, Outcome, Runtime, failed


class ByMode:
    """Runs each call on the runtime of its ``mode``; at most ``slots`` calls at once in
    all modes together (``max_concurrent_tools``)."""

    def __init__(self, runtimes: Mapping[Mode, Runtime], slots: int) -> None:
        self.runtimes = dict(runtimes)
        self._slots = threading.BoundedSemaphore(slots)

    def run(self, call: Call) -> Outcome:
        runtime = self.runtimes.get(call.mode)
        if runtime is None:
            return failed(ToolCrashed(f"no {call.mode} runtime on this worker", "ConfigError"))
        with self._slots:
            return runtime.run(call)

    def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.close()
