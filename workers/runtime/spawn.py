"""Spawn mode: a fresh Bun process per call (a process never serves two calls).

A Bun start (plus its sandbox and cgroup) costs far more than a trivial call, so
with ``ahead > 0`` processes are started *ahead of demand*: for each set of
permissions and limits in use, ``ahead`` processes wait — already in their sandbox
and cgroup, with the wrapper and the entrypoint loaded — for their single request.
A call takes the oldest one and its replacement starts at once, in the background;
after the call the process is killed with its whole group, exactly as a cold one.
Nothing of one call can reach another: each process has its own TMPDIR and is
never given a second request.

The call's env never goes into a process's environment (bwrap and the loader would
read it): it travels in the request and the wrapper sets it before the tool runs, so
module-level code of the entrypoint sees only the base environment (PATH, HOME, LANG,
TMPDIR), as in warm mode. ``ahead = 0`` starts a process per call, at the cost of a
full start per call.

What a process gets (sandbox, cgroup, process group, minimal env) is
:mod:`.launch`'s; pumping its pipes is :mod:`.pump`'s; reading its envelope
:mod:`.wire`'s.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from toolq.errors import ToolCrashed, ToolFailure
from toolq.workers.runtime.base import Call, Outcome, failed
from toolq.workers.runtime.launch import Launched, Launcher, Starters, base_environment
from toolq.workers.runtime.limits import ResourceLimits
from toolq.workers.runtime.pump import EXIT_GRACE_S, Pipes, Streams, Watch, collect
from toolq.workers.runtime.sandbox import Permissions
from toolq.workers.runtime.wire import encode_request, finish

log = logging.getLogger("toolq.worker")

Key = tuple[Permissions, ResourceLimits]
"""What a process is started with, before any call is known."""


@dataclass
class Fresh:
    """A Bun process that has served no call: its launch and pipes."""

    launched: Launched
    pipes: Pipes

    def alive(self) -> bool:
        return self.launched.proc.poll() is None

    def kill(self) -> None:
        self.pipes.close()
        self.launched.stop()


class SpawnRuntime:
    """A fresh Bun per call, ``ahead`` of them started before they are needed;
    thread-safe (the caller bounds how many calls run at once)."""

    def __init__(self, launcher: Launcher, *, ahead: int = 0) -> None:
        self.launcher = launcher
        self.ahead = ahead
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._ready: dict[Key, deque[Fresh]] = {}
        self._starting: dict[Key, int] = {}
        self._closed = False
        self._starters = Starters("toolq-spawn-ahead")
        self._disposals: queue.SimpleQueue[Fresh | None] = queue.SimpleQueue()
        self._disposer: threading.Thread | None = None

    def start(self, keys: Iterable[Key]) -> None:
        """Start ``ahead`` processes for each key now, in the background."""
        with self._lock:
            for key in keys:
                self._top_up(key)

    def ready(self, key: Key) -> list[Fresh]:
        """The processes waiting for a call with this key (oldest first)."""
        with self._lock:
            return list(self._ready.get(key, ()))

    def run(self, call: Call) -> Outcome:
        started = time.monotonic()
        nonce = secrets.token_hex(16)
        request = encode_request(call, nonce, {})
        if isinstance(request, ToolFailure):
            return failed(request, started)
        if self._pid != os.getpid():
            # A forked pool process (prefork): the parent's processes are not ours.
            self._reset()
        key: Key = (call.permissions, call.resources)
        fresh = self._take(key) if self.ahead > 0 else None
        launched_ns = None
        if fresh is None:
            launching = time.time_ns()
            try:
                fresh = self._launch(key, base_environment(call.permissions.env))
            except OSError as exc:
                return failed(ToolCrashed(str(exc)), started)
            launched_ns = (launching, time.time_ns())
        launched, streams = fresh.launched, Streams()
        try:
            failure = collect(
                fresh.pipes,
                request,
                nonce.encode(),
                call.time_limits,
                streams,
                started,
                watch=Watch.over(launched, call.resources),
                cancel=call.cancel,
                # Started ahead, a process is killed once it has answered, off the call's
                # time, without waiting for it to exit: its exit is not the call's (as a
                # warm process's is not). A cold start keeps Compozy's exit status.
                exit_grace_s=0.0 if self.ahead else EXIT_GRACE_S,
            )
        except BaseException:
            fresh.kill()
            raise
        if failure is None and streams.frame is not None:
            # The answer is in: tearing down the process, its sandbox and cgroup need not
            # delay the result (and happens whatever reading the answer does).
            launched.proc.poll()
            try:
                return _launched(finish(launched, streams, failure, call, started), launched_ns)
            finally:
                self._dispose(fresh)
        fresh.kill()  # first, so a process the kernel killed for memory is known as such
        return _launched(finish(launched, streams, failure, call, started), launched_ns)

    def close(self) -> None:
        """Kill the processes waiting for a call, and those being started once they are
        (waited for: nothing of this runtime outlives close())."""
        with self._lock:
            self._closed = True
            waiting = [fresh for line in self._ready.values() for fresh in line]
            self._ready.clear()
            starting = self._starters.running()
        for fresh in waiting:
            fresh.kill()
        Starters.wait(starting)
        disposer, self._disposer = self._disposer, None
        if disposer is not None:
            self._disposals.put(None)
            disposer.join()

    def _dispose(self, fresh: Fresh) -> None:
        """Kill a process that has answered, on the disposer thread."""
        with self._lock:
            if self._disposer is None:
                self._disposer = threading.Thread(
                    target=self._dispose_all, name="toolq-spawn-dispose", daemon=True
                )
                self._disposer.start()
        self._disposals.put(fresh)

    def _dispose_all(self) -> None:
        while (fresh := self._disposals.get()) is not None:
            try:
                fresh.kill()
            except Exception:
                log.exception("cannot dispose of a Bun process")

    # -- the processes ahead of demand -------------------------------------------------

    def _take(self, key: Key) -> Fresh | None:
        """The oldest live process for ``key`` (None if none is ready); its replacement
        starts now, while the call runs."""
        dead = []
        taken = None
        with self._lock:
            line = self._ready.setdefault(key, deque())
            while line and taken is None:
                fresh = line.popleft()
                if fresh.alive():
                    taken = fresh
                else:
                    dead.append(fresh)  # died while waiting (the OOM killer, a signal)
            if not self._closed:
                self._top_up(key)
        for fresh in dead:
            fresh.kill()
        return taken

    def _top_up(self, key: Key) -> None:
        """With the lock held: start processes until ``ahead`` are ready or starting."""
        waiting = len(self._ready.get(key, ())) + self._starting.get(key, 0)
        for _ in range(self.ahead - waiting):
            self._starting[key] = self._starting.get(key, 0) + 1
            self._starters.start(self._start_one, key)

    def _start_one(self, key: Key) -> None:
        fresh: Fresh | None
        try:
            fresh = self._launch(key, base_environment(key[0].env))
        except OSError:
            log.exception("cannot start a Bun process ahead of demand")
            fresh = None
        with self._lock:
            self._starters.done()
            self._starting[key] -= 1
            if fresh is not None and not self._closed:
                self._ready.setdefault(key, deque()).append(fresh)
                fresh = None
        if fresh is not None:
            fresh.kill()  # the runtime closed while it started

    def _launch(self, key: Key, env: Mapping[str, str]) -> Fresh:
        permissions, limits = key
        launched = self.launcher.launch(
            permissions=permissions, limits=limits, env=dict(env), warm=False
        )
        pipes = Pipes(launched.proc, launched.envelope_fd, lambda: launched.bun_pid)
        return Fresh(launched, pipes)


def _launched(outcome: Outcome, launched_ns: tuple[int, int] | None) -> Outcome:
    """The outcome with the launch the call waited for (tracing's toolq.spawn span)."""
    return outcome if launched_ns is None else replace(outcome, launched_ns=launched_ns)
