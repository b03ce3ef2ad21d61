"""Kill every Bun process group of a worker process when that process dies.

Bun runs in its own process group, so a worker killed with SIGKILL would leave
Bun and its children running. Each process that spawns Bun starts one small
reaper (this file, run as a script: it imports nothing of toolq) and tells it,
over a pipe, which groups are alive: ``+<pgid>`` and ``-<pgid>`` lines. When
the pipe reaches end-of-file — the worker process is gone, however it died —
the reaper SIGKILLs every group still listed, then exits. A process that exits normally
closes the pipe itself (atexit) and waits for its reaper, so none outlives it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading


class Reaper:
    """The spawning side: one reaper child per OS process, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1

    def track(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def untrack(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        fd = self._ensure()
        try:
            os.write(fd, line.encode())  # < PIPE_BUF: atomic across threads
        except OSError:
            with self._lock:
                self._pid = None  # the reaper died: start another next time
            os.write(self._ensure(), line.encode())

    def _ensure(self) -> int:
        pid = os.getpid()
        if self._pid == pid:
            return self._fd
        with self._lock:
            if self._pid != pid:  # first use, or we are a forked child (prefork pool)
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", __file__],
                    stdin=subprocess.PIPE,
                    start_new_session=True,  # Ctrl-C in the terminal must not kill it first
                )
                assert self._proc.stdin is not None
                self._fd = self._proc.stdin.fileno()
                self._pid = pid
                atexit.register(self._end, pid)
            return self._fd

    def _end(self, pid: int) -> None:
        """At a normal exit: end the reaper now (it kills what is still listed, as it would
        once this process is gone) and wait for it, instead of leaving it to outlive us."""
        with self._lock:
            if self._pid != pid or os.getpid() != pid:  # a forked child inherits the hook
                return
            proc, self._proc, self._pid, self._fd = self._proc, None, None, -1
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)


_reaper = Reaper()


def reaper() -> Reaper:
    return _reaper


def _serve() -> None:
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        try:
            sign, pgid = line[:1], int(line[1:])
        except ValueError:
            continue
        if sign == b"+":
            groups.add(pgid)
        else:
            groups.discard(pgid)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _serve()
