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
import select
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

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

    def loaded(self) -> bool:
        """Bun has loaded the entrypoint and waits for its request: its wrapper's ready
        line is on the envelope pipe (read, and skipped, by the call that takes it)."""
        return bool(select.select([self.pipes.envelope_fd], [], [], 0)[0])

    def kill(self) -> None:
        self.pipes.close()
        self.launched.stop()


SETTLE_GRACE_S = 0.05
"""What a call left for after its reply and nobody settled (:meth:`SpawnRuntime.settle`)
within this is done in the background."""


@dataclass
class _Left:
    """What one thread's answered calls left for after their replies."""

    disposals: list[Fresh] = field(default_factory=list)
    owed: set[Key] = field(default_factory=set)
    """Keys whose replacement process is still to be started."""
    since: float = 0.0


class SpawnRuntime:
    """A fresh Bun per call, ``ahead`` of them started before they are needed;
    thread-safe (the caller bounds how many calls run at once).

    What a call leaves for between calls — killing its answered process (its sandbox
    and cgroup coming down) and starting its replacement (~25 ms of CPU) — waits until
    its reply is stored (:meth:`settle`, which the worker calls), instead of competing
    with it for the CPU; a replacement starts at once only when no process is left
    ready. What nobody settles is done by the thread's next call, or in the background
    after ``SETTLE_GRACE_S``.
    """

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
        self._left: dict[int, _Left] = {}
        self._unsettled = threading.Event()
        self._sweeper: threading.Thread | None = None

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
        self.settle()  # what this thread's last call left, if nobody did it yet
        key: Key = (call.permissions, call.resources)
        fresh = self._take(key) if self.ahead > 0 else None
        for attempt in (1, 2):
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
                    # Started ahead, a process is killed once it has answered, off the
                    # call's time, without waiting for it to exit: its exit is not the
                    # call's (as a warm process's is not). A cold start keeps Compozy's
                    # exit status.
                    exit_grace_s=0.0 if self.ahead else EXIT_GRACE_S,
                )
            except BaseException:
                fresh.kill()
                raise
            if failure is None and streams.frame is not None:
                # The answer is in: tearing down the process, its sandbox and cgroup need
                # not delay the result (and happens whatever reading the answer does).
                launched.proc.poll()
                try:
                    return _launched(finish(launched, streams, failure, call, started), launched_ns)
                finally:
                    self._leave(disposal=fresh)
            fresh.kill()  # first, so a process the kernel killed for memory is known as such
            if attempt == 1 and _sandbox_never_started(launched, streams):
                log.warning(
                    "a sandbox failed to start (%s); the call runs in a new one",
                    bytes(streams.stderr[:300]).decode(errors="replace").strip(),
                )
                fresh = None
                continue
            break
        return _launched(finish(launched, streams, failure, call, started), launched_ns)

    def settle(self) -> None:
        """This thread's calls have replied: dispose of their processes and start their
        replacements now."""
        with self._lock:
            left = self._left.pop(threading.get_ident(), None)
        if left is not None:
            self._settle(left)

    def _settle(self, left: _Left) -> None:
        with self._lock:
            if not self._closed:
                for key in left.owed:
                    self._top_up(key)
        for fresh in left.disposals:
            self._dispose(fresh)

    def _leave(self, *, disposal: Fresh | None = None, owed: Key | None = None) -> None:
        """Leave work for after this thread's reply (:meth:`settle`)."""
        with self._lock:
            left = self._left.setdefault(threading.get_ident(), _Left())
            left.since = time.monotonic()  # the grace runs from the latest
            if disposal is not None:
                left.disposals.append(disposal)
            if owed is not None:
                left.owed.add(owed)
            if self._sweeper is None:
                self._sweeper = threading.Thread(
                    target=self._sweep, name="toolq-spawn-settle", daemon=True
                )
                self._sweeper.start()
        self._unsettled.set()

    def _sweep(self) -> None:
        """The background thread: settle what no thread settled within the grace."""
        while not self._closed:
            self._unsettled.wait()
            time.sleep(SETTLE_GRACE_S)
            self._unsettled.clear()
            with self._lock:
                due = time.monotonic() - SETTLE_GRACE_S
                late = [thread for thread, left in self._left.items() if left.since <= due]
                overdue = [self._left.pop(thread) for thread in late]
                if self._left:
                    self._unsettled.set()  # newer ones: looked at after the grace
            for left in overdue:
                self._settle(left)

    def close(self) -> None:
        """Kill the processes waiting for a call, and those being started once they are
        (waited for: nothing of this runtime outlives close())."""
        with self._lock:
            self._closed = True
            waiting = [fresh for line in self._ready.values() for fresh in line]
            waiting += [fresh for left in self._left.values() for fresh in left.disposals]
            self._left.clear()
            self._ready.clear()
            starting = self._starters.running()
        self._unsettled.set()  # the background settler sees the runtime closed, and ends
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
        starts after the call's reply when the next process in line has loaded already,
        else now (calls back to back: a replacement needs all the head start it gets)."""
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
            later = taken is not None and bool(line) and line[0].loaded()
            if not self._closed and not later:
                self._top_up(key)  # the next call must not wait for this one's reply
        if later:
            self._leave(owed=key)
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


def _sandbox_never_started(launched: Launched, streams: Streams) -> bool:
    """bwrap gave up before Bun ran (say a host socket it was to cover went away, with its
    directory, between the sandbox's look and bwrap's mount): no wrapper's ready line, bwrap's
    own error, exit status 1: the call never reached Bun."""
    return (
        streams.frame is None
        and b"ready\n" not in streams.envelope
        and launched.sandboxed
        and launched.returncode() == 1
        and bytes(streams.stderr[:7]) == b"bwrap: "
    )


def _launched(outcome: Outcome, launched_ns: tuple[int, int] | None) -> Outcome:
    """The outcome with the launch the call waited for (tracing's toolq.spawn span)."""
    return outcome if launched_ns is None else replace(outcome, launched_ns=launched_ns)
