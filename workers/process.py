"""Start a `toolq worker` as a child process and know when it is serving.

Used by `toolq demo`, the test suite and the benchmarks: a real worker process,
started the way an operator starts one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError


class WorkerProcess:
    """``with WorkerProcess(...) as worker:`` starts, waits until it answers a ping, stops."""

    def __init__(
        self,
        *,
        config: Path | None = None,
        redis_url: str,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        pool: str = "threads",
        hostname: str | None = None,
        env: Mapping[str, str] | None = None,
        loglevel: str = "INFO",
    ) -> None:
        self.hostname = hostname or f"toolq-{uuid.uuid4().hex[:8]}@localhost"
        self.redis_url = redis_url
        self.argv = [
            sys.executable,
            "-m",
            "toolq",
            "worker",
            f"--hostname={self.hostname}",
            f"--pool={pool}",
            f"--loglevel={loglevel}",
        ]
        if config is not None:
            self.argv.append(f"--config={config}")
        if queues:
            self.argv.append(f"--queues={','.join(queues)}")
        if concurrency is not None:
            self.argv.append(f"--concurrency={concurrency}")
        self.env = {**os.environ, **(env or {}), "TOOLQ_REDIS_URL": redis_url}
        # Lives as long as the worker process; closed and removed by close().
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="toolq-worker-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, app: Celery, timeout_s: float = 30.0) -> WorkerProcess:
        self.proc = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker exited with code {self.proc.returncode}:\n{self.output()[-4000:]}"
                )
            try:
                if app.control.ping(destination=[self.hostname], timeout=0.3):
                    return self
            except (OperationalError, RedisError, OSError):
                time.sleep(0.3)  # a pooled connection from before a Redis restart: retry
        self.stop()
        raise RuntimeError(f"worker did not answer within {timeout_s}s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (warm shutdown: running calls finish), then SIGKILL if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
