"""Warm mode: long-lived Bun processes with the entrypoint already loaded.

A Bun start costs ~5-10 ms of CPU; for small tools it, not the queue, is the
bottleneck. In warm mode each worker process keeps a pool of Bun processes
(``max_concurrent_tools`` of them), one call at a time per process, speaking the
same request/envelope protocol over its pipes (one request per stdin line).

What users can rely on:

- the call's env is set for that call and restored after it, and it gets its own
  private TMPDIR, removed afterwards;
- when a call ends, every process it started is killed (detached or not), the
  sandbox's /tmp and /dev/shm are emptied and the timers it left are cleared
  (:mod:`.isolation`, the wrapper);
- after a timeout, a crash, an output-cap breach or an unreadable envelope the
  process (its whole group) is killed and replaced; a process is also retired after
  ``max_calls_per_process`` calls or once its RSS passes ``max_process_rss_mb``;
  replacements are started in the background, ahead of need;
- what does survive between calls of one process is module-level state (caches,
  globals, listeners a tool registered, pending I/O callbacks): a tool that needs a
  fresh process per call is marked ``isolation: strict`` (or ``mode: spawn``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
import time

from toolq.errors import InvalidOutput, ToolCrashed, ToolFailure
from toolq.workers.runtime.base import DEFAULT_RESOURCES, Call, Outcome, failed
from toolq.workers.runtime.isolation import CallBoundary
from toolq.workers.runtime.launch import Launcher, Starters, base_environment
from toolq.workers.runtime.limits import ResourceLimits, rss_mb
from toolq.workers.runtime.pump import Pipes, Streams, Watch, collect
from toolq.workers.runtime.sandbox import Permissions
from toolq.workers.runtime.wire import encode_request, finish

log = logging.getLogger("toolq.worker")

SETTLE_GRACE_S = 0.05
"""A process whose call replied but that nobody settled (:meth:`WarmRuntime.settle`)
within this is reset in the background."""


class WarmProcess:
    """One long-lived Bun process running the wrapper in warm mode."""

    def __init__(
        self, launcher: Launcher, permissions: Permissions, resources: ResourceLimits
    ) -> None:
        self.resources = resources
        self.launched = launcher.launch(
            permissions=permissions,
            limits=resources,
            env=base_environment(permissions.env),
            warm=True,
        )
        self.tmpdir = self.launched.tmpdir
        """The host TMPDIR (unsandboxed only)."""
        self.proc = self.launched.proc
        self.boundary = CallBoundary(self.launched)
        self.pipes = Pipes(self.proc, self.launched.envelope_fd, lambda: self.launched.bun_pid)
        self.calls = 0
        self._tmp_mtime = os.stat(self.tmpdir).st_mtime_ns if self.tmpdir is not None else 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        return rss_mb(self.launched.bun_pid)

    def call(self, call: Call) -> tuple[Outcome, bool]:
        """Run one call; returns the outcome and whether this process may serve another
        once :meth:`reset` has cleared what the call left (a process that may not is
        killed by its runtime, with whatever it left)."""
        if self.calls == 0:
            self.boundary.prime()  # what the sandbox looked like before any call
        started = time.monotonic()
        nonce = secrets.token_hex(16)
        request = encode_request(call, nonce, {"TMPDIR": self.launched.tool_tmpdir})
        if isinstance(request, ToolFailure):
            return failed(request, started), True
        streams = Streams()
        failure = collect(
            self.pipes,
            request + b"\n",
            nonce.encode(),
            call.time_limits,
            streams,
            started,
            warm=True,
            watch=Watch.over(self.launched, self.resources),
            cancel=call.cancel,
        )
        alive = self.alive()  # reaps a dead process, so its exit status is known
        outcome = finish(self.launched, streams, failure, call, started)
        healthy = (
            alive
            and failure is None
            and streams.frame is not None
            and not outcome.exiting
            and outcome.kind != InvalidOutput.kind  # an unreadable or too deep envelope
        )
        if healthy:
            self.calls += 1
        return outcome, healthy

    def reset(self) -> bool:
        """Clear what the last call left, after its reply: its processes, the sandbox's
        scratch space, its TMPDIR, its network connections. False: this process must be
        retired instead of serving another call."""
        try:
            return self.boundary.clear()  # nothing of this call reaches the next
        finally:
            self.launched.end_call()  # its tunnels do not outlive the call
            self._empty_tmpdir()

    def _empty_tmpdir(self) -> None:
        """TMPDIR is private to one call at a time: clear whatever a call left in it (in a
        sandbox, the call boundary empties it with the rest of the sandbox's /tmp)."""
        if self.tmpdir is None:
            return
        mtime = os.stat(self.tmpdir).st_mtime_ns
        if mtime == self._tmp_mtime:
            return  # nothing was created or removed in it
        with os.scandir(self.tmpdir) as entries:
            leftovers = [entry.path for entry in entries]
        for path in leftovers:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._tmp_mtime = os.stat(self.tmpdir).st_mtime_ns

    def kill(self) -> None:
        self.pipes.close()
        self.launched.stop()


class WarmRuntime:
    """At most ``size`` warm processes, one call each at a time; thread-safe (a call
    waits for a free process).

    What a call leaves behind is cleared after its reply, not before it: :meth:`run`
    returns the outcome as soon as the envelope is read, and the process is reset
    (:meth:`WarmProcess.reset`: the call boundary, its TMPDIR, its connections, the
    call and RSS limits) by :meth:`settle`, which the worker calls once the reply is
    stored. A process is never handed to a call before its reset: a thread's next
    :meth:`run` settles what that thread left first, a call that finds no process free
    resets one itself, and what nobody settled within ``SETTLE_GRACE_S`` (a caller of
    the runtime that never calls :meth:`settle`) is reset in the background.
    """

    def __init__(
        self,
        launcher: Launcher,
        size: int,
        *,
        max_calls_per_process: int,
        max_rss_mb: float,
        permissions: Permissions | None = None,
        resources: ResourceLimits = DEFAULT_RESOURCES,
    ) -> None:
        self.launcher = launcher
        self.size = size
        self.max_calls = max_calls_per_process
        self.max_rss_mb = max_rss_mb
        self.permissions = permissions or Permissions()
        self.resources = resources
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[WarmProcess] = []
        self._answered: dict[int, list[tuple[WarmProcess, float]]] = {}
        """Thread id -> its processes whose call has replied, waiting for their reset
        (with when it replied)."""
        self._unsettled = threading.Event()  # set when a process is answered
        self._janitor: threading.Thread | None = None
        self._settling = 0  # answered processes being reset
        self._live = 0  # idle + busy + answered + starting: never more than size
        self._starting = 0
        self._starters = Starters("toolq-warm-start")
        self._closed = False

    def start(self) -> None:
        """Fill the pool in the background: the first calls should not pay for Bun."""
        with self._cond:
            while self._live < self.size:
                self._begin_start()

    def run(self, call: Call) -> Outcome:
        if self._pid != os.getpid():
            # A forked pool process (prefork): the parent's processes and pipes are not
            # ours to use; this process starts its own.
            self._reset()
            self.start()
        self.settle()  # what this thread's last call left, if nobody has reset it yet
        process = self._take()
        if process is None:
            return failed(ToolCrashed("cannot start a warm Bun process"), time.monotonic())
        healthy = False
        try:
            outcome, healthy = process.call(call)
        finally:
            # Answered or retired, whatever happened (an exception included): a process
            # neither would hold its pool slot for good.
            if healthy:
                with self._cond:
                    if not self._closed:
                        line = self._answered.setdefault(threading.get_ident(), [])
                        line.append((process, time.monotonic()))
                        process = None
                        if self._janitor is None:
                            self._janitor = threading.Thread(
                                target=self._sweep, name="toolq-warm-settle", daemon=True
                            )
                            self._janitor.start()
                self._unsettled.set()
            if process is not None:
                self._retire(process)  # a process whose pool closed during its call too
        return outcome

    def settle(self) -> None:
        """Reset the processes whose calls this thread ran and that have replied, and
        return them to the pool (or retire them): the work between two calls, done once
        the reply is out of the caller's way."""
        with self._cond:
            answered = self._answered.pop(threading.get_ident(), [])
            self._settling += len(answered)
        for process, _ in answered:
            self._settle(process)

    def _sweep(self) -> None:
        """The background thread: reset what was not settled within SETTLE_GRACE_S. In a
        worker every call is settled right after its reply, so it finds nothing."""
        while not self._closed:
            self._unsettled.wait()
            time.sleep(SETTLE_GRACE_S)
            self._unsettled.clear()
            overdue = []
            with self._cond:
                due = time.monotonic() - SETTLE_GRACE_S
                for thread, line in list(self._answered.items()):
                    late = [entry for entry in line if entry[1] <= due]
                    if late:
                        line[:] = [entry for entry in line if entry[1] > due]
                        if not line:
                            del self._answered[thread]
                        overdue += [process for process, _ in late]
                self._settling += len(overdue)
                if self._answered:
                    self._unsettled.set()  # newer ones: looked at again after the grace
            for process in overdue:
                self._settle(process)

    def _settle(self, process: WarmProcess) -> None:
        """Reset one answered process (counted in ``_settling``) and return or retire it."""
        healthy = False
        try:
            healthy = process.reset()
            healthy = healthy and process.calls < self.max_calls
            healthy = healthy and process.rss_mb() <= self.max_rss_mb
        finally:
            with self._cond:
                self._settling -= 1
                kept = healthy and not self._closed
                if kept:
                    self._idle.append(process)
                    self._cond.notify()
                else:
                    self._replace()  # in the same locked section: never seen as neither
            if not kept:
                process.kill()

    def close(self) -> None:
        """Kill the idle processes, and those being started once they are (waited for);
        a process in a call is killed when its call ends."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            idle += [process for line in self._answered.values() for process, _ in line]
            self._answered.clear()
            self._unsettled.set()  # the background settler sees the pool closed, and ends
            self._live -= len(idle)
            starting = self._starters.running()
        for process in idle:
            process.kill()
        Starters.wait(starting)

    def _take(self) -> WarmProcess | None:
        with self._cond:
            while not self._closed:
                while self._idle:
                    process = self._idle.pop()
                    if process.alive():
                        return process
                    self._live -= 1  # died while idle (a late timer, the OOM killer)
                    process.kill()
                if self._starting == 0 and self._live < self.size:
                    self._begin_start()
                answered = self._steal()
                if answered is not None:
                    # Every process is busy or waits for its reset after another
                    # thread's call: reset one here rather than wait for that thread.
                    self._cond.release()
                    try:
                        self._settle(answered)
                    finally:
                        self._cond.acquire()
                    continue
                if self._starting == 0 and self._settling == 0 and not self._idle:
                    return None  # starting failed
                self._cond.wait(timeout=30)
        return None

    def _steal(self) -> WarmProcess | None:
        """With the lock held: a process another thread's call left for its reset."""
        for thread, line in self._answered.items():
            process, _ = line.pop()
            if not line:
                del self._answered[thread]
            self._settling += 1
            return process
        return None

    def _retire(self, process: WarmProcess) -> None:
        with self._cond:
            self._replace()
        process.kill()

    def _replace(self) -> None:
        """With the lock held: a process leaves the pool; its replacement starts now,
        ahead of the next call."""
        self._live -= 1
        if not self._closed:
            self._begin_start()
        self._cond.notify_all()

    def _begin_start(self) -> None:
        """With the lock held: start one process in the background."""
        self._live += 1
        self._starting += 1
        self._starters.start(self._finish_start)

    def _finish_start(self) -> None:
        try:
            started = WarmProcess(self.launcher, self.permissions, self.resources)
            started.boundary.prime()  # here, not on its first call's path
            process: WarmProcess | None = started
        except OSError:
            log.exception("cannot start a warm Bun process")
            process = None
        with self._cond:
            self._starters.done()
            self._starting -= 1
            if process is not None and not self._closed:
                self._idle.append(process)
                process = None
            else:
                self._live -= 1
            self._cond.notify_all()
        if process is not None:
            process.kill()  # the pool closed while it started
