"""Start a toolq worker: a Celery worker whose one task runs tools with Bun.

Pool choice, on evidence (docs/operations.md, "Choosing a pool"): the runner waits on pipes
and enforces its own limits, so the default ``threads`` pool spends one Python
process on ``max_concurrent_tools`` calls; ``prefork`` costs a Python process
per slot, which does not fit the seed guide's 512 MiB container at 10 slots.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from celery import Celery
from celery.signals import (
    heartbeat_sent,
    task_postrun,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from toolq import logsafe
from toolq.config.celery_app import make_celery
from toolq.config.settings import BACKSTOP_MARGIN_S, CELERY_HARD_MARGIN_S, Settings
from toolq.health import HealthFile, drain_budget_s
from toolq.presence import Presence
from toolq.workers import info, poison
from toolq.workers.assembly import WorkerParts, build_worker
from toolq.workers.batch import ChunkRunner
from toolq.workers.metrics import Metrics, serve, use_multiprocess_dir
from toolq.workers.results import StoredResults, use_worker_backend
from toolq.workers.tasks import register_tasks, retry_publisher

Pool = Literal["threads", "prefork"]


def chunk_runner(app: Celery, parts: WorkerParts, pool: Pool) -> ChunkRunner:
    """How this worker runs chunks: over the free slots of its threads pool; a prefork
    pool process has one slot, so its chunks run one call at a time."""
    settings = parts.handler.settings
    extra = parts.max_concurrent - 1 if pool == "threads" else 0
    return ChunkRunner(
        handler=parts.handler,
        slots=parts.runtime,
        results=StoredResults(app, parts.redis, settings.keys, keep_s=2 * settings.redelivery_s),
        retry=retry_publisher(app, parts.handler),
        executor=ThreadPoolExecutor(max(extra, 1), thread_name_prefix="toolq-chunk"),
        extra_slots=extra,
        # A call must end before the chunk's message could be redelivered, with the
        # margins Celery's own limits keep (config/settings.py).
        budget_s=settings.redelivery_s - BACKSTOP_MARGIN_S - CELERY_HARD_MARGIN_S,
    )


def default_hostname() -> str:
    """Unique per process, so several workers on one host never share a node name."""
    return f"toolq-{os.getpid()}@{socket.gethostname()}"


def run_worker(
    settings: Settings,
    *,
    concurrency: int | None = None,
    queues: Sequence[str] | None = None,
    hostname: str | None = None,
    pool: Pool = "threads",
    loglevel: str = "INFO",
    health_file: Path | None = None,
) -> None:
    """Run a worker in this process until it is told to stop (SIGTERM: warm shutdown);
    with ``health_file``, keep it current for container probes (:mod:`toolq.health`)."""
    # prefork: each pool process runs one call at a time, so it keeps one warm Bun
    # process (started lazily after the fork); threads: one shared pool, filled now.
    metrics = None
    if settings.performance.enable_metrics:
        if pool == "prefork":
            use_multiprocess_dir()
        metrics = Metrics()
    parts = build_worker(
        settings,
        max_concurrent=concurrency,
        warm_processes=1 if pool == "prefork" else None,
        spawn_ahead=min(settings.runtime.spawn_ahead, 1) if pool == "prefork" else None,
        metrics=metrics,
    )
    if pool == "threads":
        parts.start()
    consumed = list(queues or settings.all_queues)
    node = hostname or default_hostname()
    # Each heartbeat Celery sends also stamps this worker on its queues, so producers
    # can tell a queue nobody consumes (toolq.presence); it leaves them when it stops,
    # before its Redis connection closes.
    presence = Presence(parts.redis, node, consumed)
    heartbeat_sent.connect(lambda **_: presence.beat(), weak=False)
    worker_shutdown.connect(lambda **_: presence.leave(), weak=False)
    # Whether its tools run sandboxed, for `toolq status` (toolq.workers.info).
    keys = parts.handler.settings.keys
    info.publish(parts.redis, keys, node, parts.sandbox_info)
    worker_shutdown.connect(lambda **_: info.remove(parts.redis, keys, node), weak=False)
    worker_shutdown.connect(lambda **_: parts.close(), weak=False)
    app = make_celery(settings, worker=True)
    use_worker_backend(app)
    chunks = chunk_runner(app, parts, pool)
    register_tasks(app, parts.handler, chunks)
    # A task's result is stored (its caller has the reply) before task_postrun: what its
    # calls left for between calls (a warm process's reset) is done then, on its thread.
    task_postrun.connect(lambda **_: parts.runtime.settle(), weak=False)
    worker_shutting_down.connect(lambda **_: chunks.stopping.set(), weak=False)
    if health_file is not None:
        health = HealthFile(health_file, drain_budget_s(settings))
        health.beat()
        worker_ready.connect(lambda **_: health.ready(), weak=False)
        heartbeat_sent.connect(lambda **_: health.beat(), weak=False)
        worker_shutting_down.connect(lambda **_: health.stopping(), weak=False)
    # Bad messages and broker restarts never stop it; unsigned or forged calls never run.
    poison.install(app, settings, parts.handler.signer, parts.handler.sealer)
    logsafe.install()  # values read from messages or tools never forge a log line
    if metrics is not None:
        serve(settings.performance.metrics_port, metrics)
    # Celery logs every result at INFO ("succeeded in ...: {...}"); results may be
    # sensitive, so the executor logs one line per call (tool, outcome, time) instead.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    celery_worker(
        app,
        [
            f"--pool={pool}",
            f"--concurrency={parts.max_concurrent}",
            f"--queues={','.join(consumed)}",
            f"--hostname={node}",
            f"--loglevel={loglevel}",
            "--without-mingle",
            "--without-gossip",
        ],
    )
    poison.exit_with_worker_code()


def celery_worker(app: Celery, args: list[str]) -> None:
    """``celery worker <args>`` for ``app``, as ``app.worker_main`` runs it, without the
    rest of Celery's command line: ``worker_main`` imports every ``celery`` command and
    plugin (the amqp shell's prompt_toolkit, Flower's tornado), half of a worker's
    start-up (0.45 s of 0.9 s CPU), for none of its work."""
    import click
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker

    # what the `celery` group gives its commands when run without options (NO_COLOR is
    # its one environment variable a worker heeds)
    no_color = click.BOOL.convert(os.environ.get("NO_COLOR") or "0", None, None)
    context = CLIContext(app=app, no_color=no_color, workdir=None, quiet=False)
    worker.main(args=args, obj=context, prog_name="celery worker", standalone_mode=False)
