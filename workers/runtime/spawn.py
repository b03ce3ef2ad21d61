"""Spawn mode: a fresh Bun process per call (no state survives between calls).

What a process gets (sandbox, cgroup, process group, minimal env) is
:mod:`.launch`'s; pumping its pipes is :mod:`.pump`'s; reading its envelope
:mod:`.wire`'s.
"""

from __future__ import annotations

import secrets
import shutil
import time

from toolq.errors import ToolCrashed, ToolFailure
from toolq.workers.runtime.base import Call, Outcome, failed
from toolq.workers.runtime.launch import Launcher, base_environment, call_tmpdir
from toolq.workers.runtime.pump import Pipes, Streams, Watch, collect
from toolq.workers.runtime.wire import encode_request, finish


class SpawnRuntime:
    """A fresh Bun per call; thread-safe (the caller bounds how many run at once)."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher

    def run(self, call: Call) -> Outcome:
        started = time.monotonic()
        nonce = secrets.token_hex(16)
        request = encode_request(call, nonce, {})
        if isinstance(request, ToolFailure):
            return failed(request, started)
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
                nonce.encode(),
                call.time_limits,
                streams,
                started,
                watch=Watch.over(launched, call.resources),
                cancel=call.cancel,
            )
        finally:
            pipes.close()
            launched.stop()
            shutil.rmtree(tmpdir, ignore_errors=True)
        return finish(launched, streams, failure, call, started)

    def close(self) -> None:
        """Nothing outlives a call in spawn mode."""
