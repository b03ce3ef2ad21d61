"""Pumping a process's pipes, with a real process that writes exactly what a test needs."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import pytest

from toolq.config.settings import TimeLimits
from toolq.workers.runtime.pump import Pipes, Streams, collect

NONCE = "0123456789abcdef"


@pytest.mark.parametrize("warm", [False, True], ids=["spawn", "warm"])
def test_log_lines_written_before_the_envelope_are_the_calls(warm: bool) -> None:
    """A process started ahead of demand said "ready" on its envelope pipe long before
    its call: epoll then reports the envelope pipe ahead of stderr when both are ready at
    once, and the call must still get the log lines written before its envelope (a CI
    run lost a tool's whole stderr this way; a warm process's would go to its next call,
    redacted with that call's secrets, not its own)."""
    envelope_read, envelope_write = os.pipe()
    envelope = f'{NONCE}{{"result": 1, "error": null}}\n'.encode()
    child = (
        "import os, sys, time\n"
        f"os.write({envelope_write}, b'ready\\n')\n"
        "time.sleep(0.3)\n"
        "os.write(2, b'[LOG] before the envelope\\n')\n"
        f"os.write({envelope_write}, {envelope!r})\n"
        "time.sleep(10)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(envelope_write,),
    )
    os.close(envelope_write)
    pipes = Pipes(proc, envelope_read)
    try:
        select.select([envelope_read], [], [], 5)
        assert os.read(envelope_read, 64) == b"ready\n"  # as the launcher reads it
        time.sleep(0.6)  # the log line and the envelope are both waiting now
        streams = Streams()
        failure = collect(
            pipes,
            b"{}\n",
            NONCE.encode(),
            TimeLimits(5, 6),
            streams,
            time.monotonic(),
            warm=warm,
            exit_grace_s=0.0,
        )
        assert failure is None and streams.frame is not None
        assert bytes(streams.stderr) == b"[LOG] before the envelope\n"
    finally:
        proc.kill()
        proc.wait()
        pipes.close()
        os.close(envelope_read)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()
