"""Pump one call's pipes: deliver the request, gather the envelope, stdout and stderr,
and enforce the time limits and output caps while they stream.

Shared by both runtimes (spawn makes one :class:`Pipes` per call, warm one per
process, so a warm call pays for no epoll set-up).

- the envelope arrives on a pipe of its own (not stdout), framed with a per-call
  nonce, so stray ``process.stdout.write`` calls cannot corrupt it;
- the call ends when the envelope arrives, even if the tool left timers or sockets
  open (the runtime then kills or reuses the process), and takes with it what stdout
  and stderr hold at that moment: the log lines written before the envelope;
- SIGTERM to Bun at the soft limit, a failure at the hard limit (the runtime kills
  the whole process group);
- output is bounded while it streams: envelope and stdout at 10 MiB each
  (``output_too_large``), stderr keeps its last 1 MiB and a tool that writes over
  100 MiB there is stopped too.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from toolq.config.durations import format_duration
from toolq.config.settings import TimeLimits
from toolq.errors import Cancelled, MemoryExceeded, OutputTooLarge, ToolFailure, ToolTimeout
from toolq.workers.runtime.base import CancelToken
from toolq.workers.runtime.launch import Launched
from toolq.workers.runtime.limits import ResourceLimits, cpu_seconds, rss_mb
from toolq.workers.runtime.secrets import redact_secrets

MAX_OUTPUT_BYTES = 10 * 1024 * 1024
"""Result envelope and stray stdout, each."""
MAX_STDERR_KEPT = 1024 * 1024
"""How much of stderr is kept (the last bytes: where a crash explains itself)."""
MAX_STDERR_BYTES = 100 * 1024 * 1024
"""A tool writing more than this to stderr is stopped as ``output_too_large``."""
WATCH_INTERVAL_S = 0.1
"""How often a running call's CPU time (and, without a cgroup, its memory) is checked."""
_ENVELOPE_SLACK = 64 * 1024  # nonce, metadata, framing around a 10 MiB result
_READ = 1 << 16
_DRAIN_READS = 16  # after the envelope, at most 1 MiB more per log pipe
EXIT_GRACE_S = 0.1
"""After the envelope, how long a process that serves one call may take to exit by itself
(so its exit status is true)."""


@dataclass
class Streams:
    """Bytes gathered while the process runs."""

    envelope: bytearray = field(default_factory=bytearray)
    stdout_bytes: int = 0
    stderr: bytearray = field(default_factory=bytearray)
    stderr_bytes: int = 0
    frame: bytes | None = None

    def add_stderr(self, data: bytes) -> None:
        self.stderr_bytes += len(data)
        self.stderr += data
        if len(self.stderr) > 2 * MAX_STDERR_KEPT:  # trim rarely: amortised O(1)
            del self.stderr[: len(self.stderr) - MAX_STDERR_KEPT]

    def stderr_text(self, redact: Mapping[str, str]) -> str:
        kept = bytes(self.stderr[-MAX_STDERR_KEPT:])
        text = kept.decode("utf-8", errors="replace")
        if self.stderr_bytes > len(kept):
            text = f"[... {self.stderr_bytes - len(kept)} bytes of stderr dropped ...]\n{text}"
        return redact_secrets(text, redact)


class Pipes:
    """A Bun process's pipes and exit, watched by one selector.

    Spawn mode makes one per call; warm mode keeps one per process, so a call pays
    for no epoll set-up.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        envelope_fd: int,
        tool_pid: Callable[[], int] | None = None,
    ) -> None:
        assert proc.stdin and proc.stdout and proc.stderr
        self.proc = proc
        self.tool_pid = tool_pid or (lambda: proc.pid)
        """Bun's own pid: SIGTERM at the soft limit goes to it (bwrap would end the sandbox)."""
        self.stdin_fd = proc.stdin.fileno()
        self.stdout_fd = proc.stdout.fileno()
        self.stderr_fd = proc.stderr.fileno()
        self.envelope_fd = envelope_fd
        self.pidfd = os.pidfd_open(proc.pid)
        self.selector = selectors.DefaultSelector()
        for fd in (self.stdin_fd, self.stdout_fd, self.stderr_fd, envelope_fd):
            os.set_blocking(fd, False)
        for fd in (self.stdout_fd, self.stderr_fd, envelope_fd, self.pidfd):
            self.selector.register(fd, selectors.EVENT_READ)

    def close(self) -> None:
        self.selector.close()
        os.close(self.pidfd)


class Watch:
    """Checks a running call against limits the kernel does not enforce for us."""

    @classmethod
    def over(cls, launched: Launched, resources: ResourceLimits) -> Watch | None:
        """A watch for this call, or None when there is nothing to watch: no CPU limit
        and a cgroup that bounds memory (then no /proc reads and no 100 ms wake-ups)."""
        if resources.max_cpu_time_s is None and launched.cgroup is not None:
            return None
        return cls(launched, resources)

    def __init__(self, launched: Launched, resources: ResourceLimits) -> None:
        self.launched = launched
        self.resources = resources
        # A warm process has used CPU before this call; a new one has not.
        self.cpu_at_start = (
            cpu_seconds(launched.bun_pid)
            if resources.max_cpu_time_s is not None and launched.bun_started
            else 0.0
        )

    def __call__(self) -> ToolFailure | None:
        if not self.launched.bun_started:
            return None
        pid = self.launched.bun_pid
        limit = self.resources.max_cpu_time_s
        if limit is not None:
            used = cpu_seconds(pid)
            if used is not None and used - (self.cpu_at_start or 0.0) > limit:
                return ToolTimeout(
                    f"tool used more than its CPU time limit of {format_duration(limit)}",
                    "CpuTimeExceeded",
                )
        if self.launched.cgroup is None and rss_mb(pid) > self.resources.max_memory_mb:
            return MemoryExceeded(
                f"tool used more than its memory limit of {self.resources.max_memory_mb} MB",
                "MemoryExceeded",
            )
        return None


def collect(
    pipes: Pipes,
    request: bytes,
    nonce: bytes,
    limits: TimeLimits,
    streams: Streams,
    started: float,
    *,
    warm: bool = False,
    watch: Callable[[], ToolFailure | None] | None = None,
    cancel: CancelToken | None = None,
    exit_grace_s: float = EXIT_GRACE_S,
) -> ToolFailure | None:
    """Pump pipes until the envelope, an exit, a limit or a cap; return a failure if any.

    ``warm``: the process serves more calls, so stdin stays open and nothing waits
    for it to exit after the envelope; otherwise it gets ``exit_grace_s`` to exit (its
    status, if it did, is the outcome's). ``watch`` is called every 100 ms and may end
    the call with a failure (CPU time, memory). ``cancel`` (selectable) stops the call
    as ``cancelled``: SIGTERM to Bun at once, then the hard limit's grace before the
    runtime kills the group.
    """
    proc, selector, pidfd = pipes.proc, pipes.selector, pipes.pidfd
    stdin_fd, stdout_fd, stderr_fd = pipes.stdin_fd, pipes.stdout_fd, pipes.stderr_fd
    envelope_fd = pipes.envelope_fd
    selector.register(stdin_fd, selectors.EVENT_WRITE)
    pending = memoryview(request)
    soft_at = started + limits.timeout_s
    hard_at = started + limits.hard_timeout_s
    terminated = False
    next_watch = started + WATCH_INTERVAL_S
    cancel_fd = cancel.fileno() if cancel is not None else None
    if cancel_fd is not None:
        selector.register(cancel_fd, selectors.EVENT_READ)
    stopped: Cancelled | None = None
    try:
        while True:
            now = time.monotonic()
            if stopped is None and cancel is not None and cancel.cancelled:
                stopped = Cancelled("the call was cancelled while it ran", "Cancelled")
                if cancel_fd is not None:
                    selector.unregister(cancel_fd)
                cancel_fd = None
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pipes.tool_pid(), signal.SIGTERM)
                terminated = True
                hard_at = min(hard_at, now + limits.hard_timeout_s - limits.timeout_s)
            if stopped is not None and now >= hard_at:
                return stopped
            if not terminated and now >= soft_at:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pipes.tool_pid(), signal.SIGTERM)
                terminated = True
            if now >= hard_at:
                return _timeout(limits, terminated_gracefully=False)
            if watch is not None and now >= next_watch:
                next_watch = now + WATCH_INTERVAL_S
                breach = watch()
                if breach is not None:
                    return breach
            wait = (hard_at if terminated else soft_at) - now
            if watch is not None:
                wait = min(wait, next_watch - now)
            events = selector.select(max(wait, 0.0))
            exited = False
            for key, _ in events:
                fd = key.fd
                if fd == cancel_fd:
                    continue  # seen at the top of the loop
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the process closed stdin or died: nothing to deliver
                        pending = pending[len(pending) :]
                    if not pending:
                        selector.unregister(fd)
                        if not warm:
                            assert proc.stdin is not None
                            proc.stdin.close()
                elif fd == pidfd:
                    exited = True
                elif fd in (stdout_fd, stderr_fd, envelope_fd):
                    failure = _read_into(fd, stdout_fd, stderr_fd, streams, nonce, selector)
                    if failure is None and streams.frame is not None:
                        # The log lines written before the envelope are this call's, even
                        # when their pipe is ready in the same wake-up as the envelope's.
                        _drain_logs(pipes, streams, selector)
                        if terminated:
                            return stopped or _timeout(limits, terminated_gracefully=True)
                        if not warm:
                            select.select([pidfd], [], [], exit_grace_s)
                            _drain_logs(pipes, streams, selector)
                    if failure is not None or streams.frame is not None:
                        return failure
            if exited:
                # Bun is gone (a zombie until we reap it); take what it left in the pipes.
                for fd in (envelope_fd, stdout_fd, stderr_fd):
                    while fd in selector.get_map():
                        try:
                            failure = _read_into(fd, stdout_fd, stderr_fd, streams, nonce, selector)
                        except BlockingIOError:
                            break
                        if failure is None and streams.frame is not None:
                            _drain_logs(pipes, streams, selector)
                        if terminated and failure is None and streams.frame is not None:
                            return stopped or _timeout(limits, terminated_gracefully=True)
                        if failure is not None or streams.frame is not None:
                            return stopped or failure
                if terminated:
                    return stopped or _timeout(limits, terminated_gracefully=True)
                return None
    finally:
        if stdin_fd in selector.get_map():
            selector.unregister(stdin_fd)
        if cancel_fd is not None and cancel_fd in selector.get_map():
            selector.unregister(cancel_fd)


def _drain_logs(pipes: Pipes, streams: Streams, selector: selectors.BaseSelector) -> None:
    """Take what stdout and stderr hold now, without waiting: a pipe's worth at most, so a
    writer that never pauses cannot keep the call from ending."""
    for fd in (pipes.stdout_fd, pipes.stderr_fd):
        for _ in range(_DRAIN_READS):
            if fd not in selector.get_map():
                break  # at its end already
            try:
                if _read_into(fd, pipes.stdout_fd, pipes.stderr_fd, streams, b"", selector):
                    return  # a cap: the call has its envelope; the process goes anyway
            except BlockingIOError:
                break


def _read_into(
    fd: int,
    stdout_fd: int,
    stderr_fd: int,
    streams: Streams,
    nonce: bytes,
    selector: selectors.BaseSelector,
) -> ToolFailure | None:
    """One read from a pipe; raises BlockingIOError when it is empty for now."""
    data = os.read(fd, _READ)
    if not data:
        selector.unregister(fd)
        return None
    if fd == stderr_fd:
        streams.add_stderr(data)
        if streams.stderr_bytes > MAX_STDERR_BYTES:
            return OutputTooLarge(
                f"tool wrote more than {MAX_STDERR_BYTES} bytes to stderr; stopped"
            )
        return None
    if fd == stdout_fd:
        streams.stdout_bytes += len(data)
        streams.add_stderr(data)  # stray stdout is log output, like console.*
        if streams.stdout_bytes > MAX_OUTPUT_BYTES:
            return OutputTooLarge(
                f"tool wrote more than {MAX_OUTPUT_BYTES} bytes to stdout; stopped"
            )
        return None
    streams.envelope += data
    start = streams.envelope.find(nonce)
    if start >= 0:
        end = streams.envelope.find(b"\n", start)
        if end >= 0:
            streams.frame = bytes(streams.envelope[start + len(nonce) : end])
            return None
    if len(streams.envelope) > MAX_OUTPUT_BYTES + _ENVELOPE_SLACK:
        return OutputTooLarge(f"tool output exceeds maximum size limit of {MAX_OUTPUT_BYTES} bytes")
    return None


def _timeout(limits: TimeLimits, *, terminated_gracefully: bool) -> ToolTimeout:
    soft = format_duration(limits.timeout_s)
    if terminated_gracefully:
        return ToolTimeout(
            f"tool exceeded its time limit of {soft} and was terminated (SIGTERM)", "TimeoutError"
        )
    hard = format_duration(limits.hard_timeout_s)
    return ToolTimeout(
        f"tool exceeded its time limit of {soft}; still running at the hard limit of {hard}, "
        "its process group was killed (SIGKILL)",
        "TimeoutError",
    )
