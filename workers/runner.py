"""Run tool calls in Bun and collect exactly one outcome each.

`BunRunner` is spawn mode (a fresh Bun per call); `collect`, `interpret` and
`finish` are shared with warm mode (`workers/warm.py`). What this adds to
Compozy's runner:

- the envelope arrives on a pipe of its own (not stdout), framed with a per-call
  nonce, so stray ``process.stdout.write`` calls cannot corrupt it;
- the call ends when the envelope arrives, even if the tool left timers or
  sockets open: the whole process group is then killed;
- Bun runs in its own process group: SIGTERM to Bun at the soft limit, SIGKILL
  to the whole group at the hard limit; a per-process reaper kills every group
  if the worker itself dies;
- output is bounded while it streams: envelope and stdout at 10 MiB each
  (``output_too_large``, the process is stopped), stderr keeps its last 1 MiB
  and a tool that writes over 100 MiB there is stopped too;
- the tool sees a minimal environment (PATH, HOME, LANG, a private TMPDIR) plus
  the call's env, never the worker's own variables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from toolq.config.durations import format_duration
from toolq.config.settings import ToolLimits
from toolq.envelope import ToolErrorInfo, normalize_result
from toolq.errors import (
    InvalidInput,
    InvalidOutput,
    MemoryExceeded,
    OutputTooLarge,
    ToolCrashed,
    ToolFailure,
    ToolTimeout,
)
from toolq.validation import check_input_size
from toolq.workers.launch import Launched, Launcher, base_environment, call_tmpdir
from toolq.workers.limits import ResourceLimits, cpu_seconds, rss_mb
from toolq.workers.sandbox import Permissions

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 10 * 1024 * 1024
"""Result envelope and stray stdout, each."""
MAX_STDERR_KEPT = 1024 * 1024
"""How much of stderr is kept (the last bytes: where a crash explains itself)."""
MAX_STDERR_BYTES = 100 * 1024 * 1024
"""A tool writing more than this to stderr is stopped as ``output_too_large``."""
STDERR_IN_ERROR = 4096
"""How much of the stderr tail goes into a crash's error."""
_ENVELOPE_SLACK = 64 * 1024  # nonce, metadata, framing around a 10 MiB result
_READ = 1 << 16
_EXIT_GRACE_S = 0.1  # after the envelope, let Bun exit by itself (a true exit status)


DEFAULT_RESOURCES = ResourceLimits(
    max_memory_mb=2048, max_processes=256, max_open_files=1024, max_cpu_time_s=None
)
WATCH_INTERVAL_S = 0.1
"""How often a running call's CPU time (and, without a cgroup, its memory) is checked."""


@dataclass(frozen=True)
class Call:
    """One tool invocation, validated, with its effective limits and permissions."""

    tool_id: str
    tool_exec_id: str
    input: Any
    env: Mapping[str, str]
    limits: ToolLimits
    config: Mapping[str, Any] = field(default_factory=dict)
    permissions: Permissions = field(default_factory=Permissions)
    resources: ResourceLimits = DEFAULT_RESOURCES


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


def redact_secrets(text: str, env: Mapping[str, str]) -> str:
    """Replace every env value of three characters or more with ``***``."""
    for value in sorted(env.values(), key=len, reverse=True):
        if len(value) >= 3:
            text = text.replace(value, "***")
    return text


class BunRunner:
    """Spawns Bun per call; thread-safe, at most ``max_concurrent`` at once."""

    def __init__(
        self,
        launcher: Launcher,
        max_concurrent: int,
        slots: threading.BoundedSemaphore | None = None,
    ) -> None:
        self.launcher = launcher
        self._slots = slots or threading.BoundedSemaphore(max_concurrent)

    def run(self, call: Call) -> Outcome:
        started = time.monotonic()
        nonce = secrets.token_hex(16)
        request = encode_request(call, nonce, {})
        if isinstance(request, ToolFailure):
            return failed(request, started)
        with self._slots:
            return self._spawn_and_collect(call, request, nonce.encode())

    def _spawn_and_collect(self, call: Call, request: bytes, nonce: bytes) -> Outcome:
        started = time.monotonic()  # limits count from here, not from waiting for a slot
        tmpdir = call_tmpdir()
        try:
            launched = self.launcher.launch(
                tmpdir=tmpdir,
                permissions=call.permissions,
                limits=call.resources,
                env=base_environment(call.permissions.env),  # call.env goes in the request
                warm=False,
            )
        except OSError as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            return failed(ToolCrashed(str(exc)), started)
        streams = Streams()
        pipes = Pipes(launched.proc, launched.envelope_fd, lambda: launched.bun_pid)
        try:
            failure = collect(
                pipes,
                request,
                nonce,
                call.limits,
                streams,
                started,
                watch=Watch.over(launched, call.resources),
            )
        finally:
            pipes.close()
            launched.stop()
            shutil.rmtree(tmpdir, ignore_errors=True)
        return finish(launched, streams, failure, call, started)


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


def finish(
    launched: Launched, streams: Streams, failure: ToolFailure | None, call: Call, started: float
) -> Outcome:
    """The outcome of a call; a process the kernel killed for memory is memory_exceeded."""
    if launched.memory_exceeded() and streams.frame is None:
        failure = MemoryExceeded(
            f"tool used more than its memory limit of {launched.limits.max_memory_mb} MB "
            "and was killed",
            "MemoryExceeded",
        )
    return interpret(launched.returncode(), streams, failure, call, started)


def encode_request(call: Call, nonce: str, extra_env: Mapping[str, str]) -> bytes | ToolFailure:
    """The wrapper's request line, or why it cannot be sent (not JSON, too big)."""
    try:
        request = json.dumps(
            {
                "tool_id": call.tool_id,
                "tool_exec_id": call.tool_exec_id,
                "input": call.input,
                "config": dict(call.config),
                "env": {**extra_env, **call.env},
                "timeout_ms": int(call.limits.timeout_s * 1000),
                "nonce": nonce,
            },
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
    except (TypeError, ValueError) as exc:
        return InvalidInput(f"input is not JSON: {exc}", "ParseError")
    try:
        check_input_size(len(request))
    except InvalidInput as exc:
        return exc
    return request


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


def collect(
    pipes: Pipes,
    request: bytes,
    nonce: bytes,
    limits: ToolLimits,
    streams: Streams,
    started: float,
    *,
    warm: bool = False,
    watch: Callable[[], ToolFailure | None] | None = None,
) -> ToolFailure | None:
    """Pump pipes until the envelope, an exit, a limit or a cap; return a failure if any.

    ``warm``: the process serves more calls, so stdin stays open and nothing waits
    for it to exit after the envelope. ``watch`` is called every 100 ms and may end
    the call with a failure (CPU time, memory).
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
    try:
        while True:
            now = time.monotonic()
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
                    if failure is None and streams.frame is not None and terminated:
                        return _timeout(limits, terminated_gracefully=True)
                    if failure is None and streams.frame is not None and not warm:
                        select.select([pidfd], [], [], _EXIT_GRACE_S)
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
                        if terminated and failure is None and streams.frame is not None:
                            return _timeout(limits, terminated_gracefully=True)
                        if failure is not None or streams.frame is not None:
                            return failure
                if terminated:
                    return _timeout(limits, terminated_gracefully=True)
                return None
    finally:
        if stdin_fd in selector.get_map():
            selector.unregister(stdin_fd)


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


def _timeout(limits: ToolLimits, *, terminated_gracefully: bool) -> ToolTimeout:
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


def interpret(
    returncode: int | None,
    streams: Streams,
    failure: ToolFailure | None,
    call: Call,
    started: float,
) -> Outcome:
    """Turn what was collected into an outcome (``returncode`` None: still running)."""
    total_ms = int((time.monotonic() - started) * 1000)
    stderr = streams.stderr_text(call.env)
    code, sig = _exit_status(returncode)
    common = {
        "total_time_ms": total_ms,
        "exit_code": code,
        "exit_signal": sig,
        "stderr": stderr,
        "output_bytes": len(streams.envelope),
    }
    if failure is None and streams.frame is not None:
        try:
            envelope = json.loads(streams.frame)
            metadata = envelope.get("metadata") or {}
            execution_ms = int(metadata.get("execution_time", total_ms))
            error = envelope.get("error")
            common["exiting"] = bool(metadata.get("exiting"))
        except (ValueError, AttributeError, TypeError) as exc:
            failure = InvalidOutput(f"tool produced an unreadable envelope: {exc}")
        else:
            if error:
                hint = error.get("retryable")
                info = ToolErrorInfo(
                    kind=str(error.get("kind") or "tool_error"),
                    message=str(error.get("message", "")),
                    name=str(error.get("name") or "Error"),
                    stack=error.get("stack"),
                    retryable_hint=hint if isinstance(hint, bool) else None,
                )
                return Outcome(None, info, execution_ms, **common)  # type: ignore[arg-type]
            result = normalize_result(envelope.get("result"))
            return Outcome(result, None, execution_ms, **common)  # type: ignore[arg-type]
    if failure is None:
        if sig is not None:
            failure = ToolCrashed(
                f"Bun was killed by signal {sig} before reporting a result", "Crashed"
            )
        elif code == 0:
            failure = ToolCrashed(
                "Bun exited with code 0 before reporting a result (did the tool call "
                "process.exit?)",
                "Crashed",
            )
        else:
            failure = ToolCrashed(
                f"Bun exited with code {code} before reporting a result", "Crashed"
            )
    tail = stderr[-STDERR_IN_ERROR:] if isinstance(failure, ToolCrashed) else None
    info = ToolErrorInfo.from_failure(failure, stderr=tail or None)
    return Outcome(None, info, total_ms, **common)  # type: ignore[arg-type]


def failed(failure: ToolFailure, started: float) -> Outcome:
    elapsed = int((time.monotonic() - started) * 1000)
    return Outcome(None, ToolErrorInfo.from_failure(failure), elapsed, elapsed)


def _exit_status(returncode: int | None) -> tuple[int | None, str | None]:
    if returncode is None or returncode >= 0:
        return returncode, None
    try:
        return None, signal.Signals(-returncode).name
    except ValueError:
        return None, f"signal {-returncode}"
