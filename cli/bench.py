"""`toolq bench` / `make bench`: toolq measured against what a user would pick instead,
in the same run.

Three subjects, one trivial call each, through the same Redis:

- **plain Celery**: a no-op task of a minimal Celery app with none of toolq's settings
  (:mod:`toolq.cli.bench_baseline`: late acks, prefetch 1), on its own worker process with the
  same pool (threads) and slot count — what users compare toolq with;
- **toolq.noop**: a no-op task on toolq's own worker (toolq's Celery settings, no tool);
- **tool**: a trivial tool called through toolq (per runtime mode), with the circuit
  breaker off as the bench project has it (the runtime alone); in warm mode also the
  same tool with toolq's default breaker on (its Redis round trips in the figures).

Each is measured two ways, in interleaved rounds (the order rotates per round):

- **drain**: a queue pre-filled with N calls, drained by the worker (worker-side
  throughput: the producer only polls, and the end is the last result's ``date_done``);
- **closed loop**: enqueue N, then collect every result, producer included (calls/s),
  and one caller's sequential calls, enqueue to result (p50/p95 latency).

Also: the seed guide's input sizes (1 KB to 1 MB) against toolq.noop carrying the same
payload; memory of the whole worker tree with ``max_concurrent_tools`` calls running
against the seed guide's 512 MiB; CPU per call against starting the wrapper with Bun
directly. Every figure is the median of the rounds, reported as a ratio to its baseline.
Results go to ``bench/RESULTS.md`` and a PNG of latency by input size; with py-spy
installed, where one call's CPU goes (:mod:`toolq.cli.profile_call`) too.

Measured here, in interleaved rounds; how a worker is driven is
:mod:`toolq.cli.bench_loops`, a process tree's memory and CPU :mod:`toolq.cli.meters`,
the figures and their report :mod:`toolq.cli.bench_report`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from toolq.cli import bench_baseline, spawn_floor
from toolq.cli.bench_loops import (
    Side,
    closed_loop,
    drain_throughput,
    map_rate,
    one_caller,
    peak_memory_while_busy,
    rotated,
    run_tool,
    send_noop,
    send_task,
    warm_up,
    wrapper_cpu_ms,
)
from toolq.cli.bench_report import (
    BULK_CALLS,
    CONCURRENCY,
    LABELS,
    PACED_CALLS,
    PACED_EVERY_S,
    PROJECT,
    SIZES,
    SUBJECTS,
    Figures,
    plot,
    render,
)
from toolq.cli.devredis import drop_queue, ensure_redis, scratch_database
from toolq.cli.loadtest import percentile
from toolq.cli.meters import CpuMeter
from toolq.cli.profile_call import profile_subject, py_spy, wall_breakdown
from toolq.config.loader import load_settings
from toolq.producers.client import ToolClient
from toolq.workers.process import WorkerProcess


def run_bench(
    *,
    modes: Sequence[str] = ("spawn", "warm"),
    rounds: int = 5,
    calls: int = 500,
    sequential: int = 100,
    per_size: int = 15,
    out: Path = Path("bench") / "RESULTS.md",
    sandbox: str = "auto",
    profile: bool | None = None,
    busy_core: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, Figures]:
    """Measure, then write the report; ``profile`` (default: if py-spy is installed) adds
    where a call's CPU goes; ``busy_core``: another process keeps one core busy all along
    (CI-like load)."""
    if profile is None:
        profile = py_spy() is not None
    results: dict[str, Figures] = {}
    with (
        busy(busy_core),
        ensure_redis(quiet=True) as base_url,
        scratch_database(base_url, "bench") as redis_url,  # ~40,000 results, gone after
    ):
        with baseline_worker(redis_url, concurrency=CONCURRENCY) as baseline:
            for mode in modes:
                say(f"mode {mode}: starting a worker")
                results[mode] = _bench_mode(
                    mode,
                    redis_url,
                    baseline,
                    rounds=rounds,
                    calls=calls,
                    sequential=sequential,
                    per_size=per_size,
                    sandbox=sandbox,
                    profile=profile,
                    say=say,
                )
        server = redis.Redis.from_url(redis_url).info("server").get("redis_version", "?")
        layers = None
        if any(mode.startswith("spawn") for mode in modes):
            say("spawn: the irreducible sandboxed start and toolq's layers over it")
            layers = spawn_floor.measure(runs=10 * rounds)
        if layers is not None:
            floor_cpu_ms = layers[spawn_floor.LAYERS[0]]
        else:  # no sandbox here: Bun on the wrapper, unsandboxed
            floor_cpu_ms = [wrapper_cpu_ms() for _ in range(rounds)]
    load = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        render(
            results,
            floor_cpu_ms,
            rounds,
            calls,
            sequential,
            per_size,
            str(server),
            sandbox,
            out.with_suffix(".png").name,
            load,
            layers=layers,
            busy=busy_core,
        )
    )
    chart = out.with_suffix(".png")  # beside the report, named after it
    plot(results, chart)
    say(f"wrote {out} and {chart}")
    return results


@contextlib.contextmanager
def busy(on: bool) -> Iterator[None]:
    """With ``on``: another process spins on one core while the block runs."""
    if not on:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _bench_mode(
    mode: str,
    redis_url: str,
    baseline: tuple[Celery, BaselineWorker],
    *,
    rounds: int,
    calls: int,
    sequential: int,
    per_size: int,
    sandbox: str,
    profile: bool,
    say: Callable[[str], None],
) -> Figures:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    drain_queue = f"drain-{queue}"  # the drains fill it, and each empties and drops it
    env = {"TOOLQ_RUNTIME__MODE": mode, "TOOLQ_RUNTIME__SANDBOX": sandbox}
    if mode == "spawn-cold":  # spawn without processes started ahead of demand
        env.update(TOOLQ_RUNTIME__MODE="spawn", TOOLQ_RUNTIME__SPAWN_AHEAD="0")
    figures = Figures()
    plain_app, plain_worker = baseline
    plain_queue = plain_worker.queue
    with bench_worker(
        PROJECT / "compozy.yaml",
        redis_url,
        queue,
        env,
        known_queues=[drain_queue],
        concurrency=CONCURRENCY,
    ) as (
        client,
        worker,
    ):
        toolq_side = Side(client.app, worker.hostname, worker.pid, CpuMeter(worker.pid))
        plain_side = Side(plain_app, plain_worker.hostname, plain_worker.pid, plain_worker.cpu)
        senders: dict[str, tuple[Side, Callable[[str], Any]]] = {
            "celery": (plain_side, functools.partial(send_task, plain_app, bench_baseline.NOOP)),
            "toolq.noop": (toolq_side, functools.partial(send_noop, client)),
            "tool": (toolq_side, lambda q: client.enqueue("noop", {}, queue=q)),
            "guarded": (toolq_side, lambda q: client.enqueue("noop_guarded", {}, queue=q)),
        }
        home = {"celery": plain_queue, "toolq.noop": queue, "tool": queue, "guarded": queue}
        names = SUBJECTS if mode == "warm" else SUBJECTS[:3]
        for name in names:
            warm_up(functools.partial(senders[name][1], home[name]))
        for round_no in range(1, rounds + 1):
            say(f"mode {mode}: round {round_no}/{rounds}")
            for name in rotated(names, round_no):
                side, send = senders[name]
                subject = figures.subjects[name]
                cpu_before = side.cpu.seconds()
                subject.drain.append(drain_throughput(side, redis_url, calls, send, drain_queue))
                subject.cpu_ms.append((side.cpu.seconds() - cpu_before) * 1000 / calls)
                rate, batch = closed_loop(functools.partial(send, home[name]), calls)
                subject.closed.append(rate)
                subject.batch_p50_ms.append(percentile(sorted(batch), 50))
                subject.batch_p95_ms.append(percentile(sorted(batch), 95))
                latencies = one_caller(functools.partial(send, home[name]), sequential)
                subject.p50_ms.append(percentile(sorted(latencies), 50))
                subject.p95_ms.append(percentile(sorted(latencies), 95))
                paced = one_caller(
                    functools.partial(send, home[name]), PACED_CALLS, every_s=PACED_EVERY_S
                )
                subject.paced_p50_ms.append(percentile(sorted(paced), 50))
                subject.paced_p95_ms.append(percentile(sorted(paced), 95))
            for size in SIZES:
                payload = {"data": "x" * size}
                figures.baseline_sizes.setdefault(size, []).append(
                    one_caller(functools.partial(send_noop, client, queue, payload), per_size)
                )
                figures.sizes.setdefault(size, []).append(
                    one_caller(
                        functools.partial(client.enqueue, "echo_size", payload, queue=queue),
                        per_size,
                    )
                )
            rss, pss = peak_memory_while_busy(client, queue, worker.pid)
            figures.peak_rss_mib.append(rss)
            figures.peak_pss_mib.append(pss)
            if mode == "warm":
                plain_send = functools.partial(senders["celery"][1], plain_queue)
                for kind in rotated(("plain", "map", "single"), round_no):
                    if kind == "plain":
                        figures.bulk_plain.append(closed_loop(plain_send, BULK_CALLS)[0])
                    else:
                        alone = kind == "single"
                        rate = map_rate(client, queue, BULK_CALLS, 1 if alone else None)
                        (figures.bulk_single if alone else figures.bulk).append(rate)
        # After the rounds: sampling slows what it samples.
        profiled = names if mode == "warm" else ("tool",) if mode == "spawn" else ()
        for name in profiled if profile else ():
            say(f"mode {mode}: profiling {LABELS[name]}")
            side, send = senders[name]
            figures.profiles[name] = profile_subject(
                worker_pid=side.pid,
                drain=functools.partial(
                    drain_throughput, side, redis_url, calls, send, drain_queue
                ),
                closed_loop=functools.partial(
                    closed_loop, functools.partial(send, home[name]), calls
                ),
                calls=calls,
                redis_url=redis_url,
                tree_cpu_s=side.cpu.seconds,
            )
            if name in ("tool", "guarded"):
                tool_id = "noop" if name == "tool" else "noop_guarded"
                figures.profiles[name].wall = wall_breakdown(
                    functools.partial(run_tool, client, tool_id, queue),
                    sequential,
                )
        figures.cpu_source = toolq_side.cpu.source
    toolq_side.cpu.close()  # the worker has exited
    return figures


@contextlib.contextmanager
def baseline_worker(redis_url: str, *, concurrency: int) -> Iterator[tuple[Celery, BaselineWorker]]:
    """The plain Celery app's worker (its own process) and a producer for it."""
    app = bench_baseline.producer(redis_url)
    queue = f"baseline-{uuid.uuid4().hex[:8]}"
    try:
        worker = BaselineWorker(redis_url, queue, concurrency)
        with worker:
            worker.start(app)
            worker.cpu = CpuMeter(worker.pid)
            yield app, worker
        worker.cpu.close()
    finally:
        app.close()
        drop_queue(redis_url, queue)


class BaselineWorker(WorkerProcess):
    """``python -m celery -A toolq.cli.bench_baseline worker``, as a user would start it
    (threads pool, the same slots as toolq's; no mingle or gossip, as toolq's worker)."""

    def __init__(self, redis_url: str, queue: str, concurrency: int) -> None:
        super().__init__(redis_url=redis_url, hostname=f"baseline-{uuid.uuid4().hex[:8]}@localhost")
        self.queue = queue
        self.cpu: CpuMeter
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            bench_baseline.__name__,
            "-b",
            redis_url,
            "--result-backend",
            redis_url,
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--queues={queue}",
            f"--hostname={self.hostname}",
            "--loglevel=WARNING",
            "--without-mingle",
            "--without-gossip",
        ]


@contextlib.contextmanager
def bench_worker(
    config: Path,
    redis_url: str,
    queue: str,
    env: dict[str, str],
    known_queues: Sequence[str] = (),
    **worker_options: Any,
) -> Iterator[tuple[ToolClient, WorkerProcess]]:
    """A client and a running worker on a private queue, stopped and dropped afterwards;
    ``known_queues``: others the client sends to on purpose (no warning that no worker
    reads them: the drains hand theirs to a worker when filled)."""
    # The drains hand a filled queue to the worker with add_consumer: a remote-control
    # command a worker obeys only with remote_control: all (workers/control.py).
    env = {**env, "TOOLQ_REMOTE_CONTROL": "all"}
    overrides: dict[str, Any] = {"redis_url": redis_url, "queue": queue}
    if known_queues:
        overrides["queues"] = {name: [] for name in known_queues}  # no tool routed there
    settings = load_settings(config, environ=env, overrides=overrides)
    with (
        ToolClient(settings) as client,
        WorkerProcess(
            config=config,
            redis_url=redis_url,
            queues=[queue],
            loglevel="WARNING",
            env=env,
            **worker_options,
        ) as worker,
    ):
        worker.start(client.app)
        yield client, worker
    drop_queue(redis_url, queue)
