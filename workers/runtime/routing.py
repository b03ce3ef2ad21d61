"""One runtime per mode behind one :class:`Runtime`, sharing the worker's slots."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

from toolq.errors import ToolCrashed
from toolq.workers.runtime.base import Call, Mode, Outcome, Runtime, failed


@runtime_checkable
class Settles(Protocol):
    """A runtime that leaves work for between two calls (:meth:`.warm.WarmRuntime.settle`)."""

    def settle(self) -> None: ...


class ByMode:
    """Runs each call on the runtime of its ``mode``; at most ``slots`` calls at once in
    all modes together (``max_concurrent_tools``).

    A single call waits for a slot. A chunk of calls (:mod:`toolq.workers.batch`) takes
    only slots that are free, and holds one across several calls with :meth:`holding`,
    giving it up as soon as a single call is waiting for one.
    """

    def __init__(self, runtimes: Mapping[Mode, Runtime], slots: int) -> None:
        self.runtimes = dict(runtimes)
        self._settling = [runtime for runtime in runtimes.values() if isinstance(runtime, Settles)]
        self._slots = threading.BoundedSemaphore(slots)
        self._held = threading.local()
        self._lock = threading.Lock()
        self._waiting = 0

    def run(self, call: Call) -> Outcome:
        runtime = self.runtimes.get(call.mode)
        if runtime is None:
            return failed(ToolCrashed(f"no {call.mode} runtime on this worker", "ConfigError"))
        if getattr(self._held, "slot", False):  # this thread holds one (a chunk's call)
            return runtime.run(call)
        self._acquire()
        try:
            return runtime.run(call)
        finally:
            self._slots.release()

    def settle(self) -> None:
        """This thread's calls have replied: do the work they left for between calls
        (a warm process's reset), off their callers' path. The worker calls it once a
        task's result is stored."""
        for runtime in self._settling:
            runtime.settle()

    def _acquire(self) -> None:
        """Take a slot, waiting (and so contending) if none is free."""
        if self._slots.acquire(blocking=False):
            return
        with self._lock:
            self._waiting += 1
        try:
            self._slots.acquire()
        finally:
            with self._lock:
                self._waiting -= 1

    @property
    def contended(self) -> bool:
        """A call (or a chunk, for its first slot) is waiting for a slot."""
        return self._waiting > 0

    @contextmanager
    def holding(self, *, wait: bool) -> Iterator[bool]:
        """Hold a slot for the calls this thread runs (yields False if none was free
        and ``wait`` is False): a chunk pays for its slot once, not per call."""
        if wait:
            self._acquire()
        elif not self._slots.acquire(blocking=False):
            yield False
            return
        self._held.slot = True
        try:
            yield True
        finally:
            self._held.slot = False
            self._slots.release()

    def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.close()
