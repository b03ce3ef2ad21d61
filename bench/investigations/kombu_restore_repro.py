"""Minimal repro of a kombu Redis-transport bug (kombu 5.7.0, celery 5.7.0, redis-py 8.1):
a busy Celery worker dies when Redis restarts, with exit code 0.

    .venv/bin/python bench/investigations/kombu_restore_repro.py     # kombu as installed: BUG
    .venv/bin/python bench/investigations/kombu_restore_repro.py --patched  # toolq's brokerfix

Plain Celery (no toolq task): one task that sleeps 3 s, a threads worker with 2 slots
(one call running, one slot free, so a BRPOP is outstanding), Redis killed (SIGKILL)
while the task runs, then started again. Prints the worker's exit code and its
"Unrecoverable error", if any. What happens (Celery's
``Consumer.on_connection_error_after_connected``: ``connection.collect()``, then
``connection.close()``):

1. The event loop sees the connection drop (here first on the pub/sub connection).
   ``collect()`` closes the default channel; ``redis.Channel.close()`` first reads the
   outstanding BRPOP reply, which raises ``ConnectionError``, so the close stops before
   ``virtual.Channel.close()``; ``maybe_close_channel`` swallows the error and
   ``_do_close_transport()`` sets ``transport.client = None``.
2. ``close()`` closes the same channel again; now ``virtual.Channel.close()`` runs
   ``QoS.restore_unacked_once()`` -> ``restore_unacked()`` -> ``conn_or_acquire()`` ->
   ``Channel.pool`` -> ``_connparams()`` -> ``self.connection.client.hostname``:
   ``AttributeError: 'NoneType' object has no attribute 'hostname'``, not a connection
   error, so it escapes ``ignore_errors``: "Unrecoverable error", the worker stops.
3. ``Celery.worker_main()`` drops the worker's exit code (``Celery.start`` returns it,
   ``worker_main`` does not): the process exits 0, and no supervisor restarts it.

The same ``_connparams`` lookup fails when the running task finishes and is
acknowledged on its old channel after the reconnect.

Suggested upstream fixes: in kombu, let ``redis.Channel.close()`` finish closing when the
pending BRPOP read raises a connection error, and make ``_connparams`` raise a connection
error (or reuse the parameters the pool was first built with) once
``self.connection.client`` is gone; in Celery, ``worker_main`` should return or exit with
the worker's exit code.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402

from toolq.cli.devredis import RedisServer  # noqa: E402  (a redis-server on a free port)


def make_app(url: str) -> Celery:
    app = Celery("repro", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1)

    @app.task(name="repro.sleep")  # type: ignore[untyped-decorator]
    def sleep(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    return app


def worker(url: str, patched: bool) -> None:
    if patched:
        from toolq.workers import brokerfix

        brokerfix.install()
    make_app(url).worker_main(
        [
            "worker",
            "--pool=threads",
            "--concurrency=2",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=INFO",
        ]
    )


def main() -> int:
    patched = "--patched" in sys.argv
    server = RedisServer(persistent=True).start()
    log = Path(server.workdir) / "worker.log"
    try:
        with log.open("wb") as out:
            argv = [sys.executable, __file__, "--worker", server.url]
            proc = subprocess.Popen(
                [*argv, "--patched"] if patched else argv, stdout=out, stderr=subprocess.STDOUT
            )
        app = make_app(server.url)
        deadline = time.monotonic() + 30
        while not app.control.ping(timeout=0.5) and time.monotonic() < deadline:
            time.sleep(0.2)
        app.send_task("repro.sleep", args=[3.0])
        time.sleep(1.0)  # the task is running, one slot is free
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait()
        time.sleep(2.0)
        server.start()
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            code = None
            proc.terminate()
            proc.wait(timeout=30)
        app.close()
        text = log.read_text(errors="replace")
        crash = [line for line in text.splitlines() if "Unrecoverable error" in line]
        print(f"worker exit code: {code if code is not None else 'still running (survived)'}")
        print(crash[0] if crash else "no unrecoverable error")
        return 1 if crash else 0
    finally:
        server.close()


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[sys.argv.index("--worker") + 1], "--patched" in sys.argv)
    else:
        raise SystemExit(main())
