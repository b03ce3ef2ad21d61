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
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import celery
import redis
from celery import Celery

from toolq.cli import bench_baseline
from toolq.cli.devredis import drop_queue, ensure_redis, scratch_database
from toolq.cli.loadtest import percentile
from toolq.cli.profile_call import Breakdown, profile_subject, py_spy, wall_breakdown
from toolq.cli.profile_call import report as profile_report
from toolq.config.celery_app import NOOP_TASK
from toolq.config.loader import load_settings
from toolq.producers.client import ToolClient
from toolq.workers.process import WorkerProcess
from toolq.workers.runtime.bun import WRAPPER, find_bun

if TYPE_CHECKING:
    from toolq.workers.assembly import WorkerParts

PROJECT = Path(__file__).resolve().parent / "projects" / "bench"
"""Shipped inside the package: `toolq bench` works from an installed wheel too."""
SIZES = (1024, 10 * 1024, 100 * 1024, 1024 * 1024)
CONCURRENCY = 10
MEMORY_BUDGET_MIB = 512
BULK_CALLS = 2000
PACED_EVERY_S = 0.05
"""Paced latency: one call every 50 ms (20 calls/s), a load every mode sustains here. Back
to back, a spawn-mode caller is a throughput test: each call sets off a replacement
start (~25 ms of CPU), so one caller without pauses saturates two cores."""
PACED_CALLS = 50
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
SUBJECTS = ("celery", "toolq.noop", "tool", "guarded")
"""The plain Celery no-op (the baseline), toolq's own no-op task, a trivial tool."""
LABELS = {
    "celery": "plain Celery no-op",
    "toolq.noop": "toolq.noop task",
    "tool": "tool",
    "guarded": "tool, breaker on",
}
"""``guarded``: the trivial tool with toolq's default circuit breaker (warm mode only); the
bench project turns the breaker off for the others, so they measure the runtime alone."""


@dataclass
class Subject:
    """One subject's measurements, one entry per round."""

    drain: list[float] = field(default_factory=list)
    closed: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p95_ms: list[float] = field(default_factory=list)
    batch_p50_ms: list[float] = field(default_factory=list)
    """Closed loop: enqueue to result in hand, every call of the batch in flight at once."""
    batch_p95_ms: list[float] = field(default_factory=list)
    paced_p50_ms: list[float] = field(default_factory=list)
    """One caller, a call every :data:`PACED_EVERY_S` (enqueue to result)."""
    paced_p95_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    """CPU per call of the serving worker's process tree during the drain."""


@dataclass
class Figures:
    """One runtime mode's measurements, one entry per round."""

    subjects: dict[str, Subject] = field(
        default_factory=lambda: {name: Subject() for name in SUBJECTS}
    )
    sizes: dict[int, list[list[float]]] = field(default_factory=dict)
    baseline_sizes: dict[int, list[list[float]]] = field(default_factory=dict)
    peak_rss_mib: list[float] = field(default_factory=list)
    """The sum of the tree's RSS: counts pages shared by several processes (Bun's own
    code, mapped by each of them) once per process."""
    peak_pss_mib: list[float] = field(default_factory=list)
    """The sum of the tree's PSS (shared pages split among their sharers): the memory the
    tree really holds, which is what a container's memory limit is charged."""
    bulk: list[float] = field(default_factory=list)
    """``ToolClient.map()`` of :data:`BULK_CALLS` trivial calls, calls/s (warm mode)."""
    bulk_plain: list[float] = field(default_factory=list)
    """The plain Celery no-op's closed loop at the same number of calls, calls/s."""
    bulk_single: list[float] = field(default_factory=list)
    """``map()`` with ``chunk_size=1`` (one message per call), calls/s."""
    profiles: dict[str, Breakdown] = field(default_factory=dict)
    cpu_source: str = "/proc tree"
    """Where a call's CPU goes, per subject (``--profile``)."""

    @property
    def tool(self) -> Subject:
        return self.subjects["tool"]


@dataclass
class Target:
    """One of the issue's targets, measured."""

    name: str
    value: str
    goal: str
    met: bool


@dataclass
class _Side:
    """How to reach one worker: its app (control, result keys), hostname and process."""

    app: Celery
    hostname: str
    pid: int
    cpu: CpuMeter


def run_bench(
    *,
    modes: Sequence[str] = ("spawn", "warm"),
    rounds: int = 3,
    calls: int = 500,
    sequential: int = 100,
    per_size: int = 15,
    out: Path = Path("bench") / "RESULTS.md",
    sandbox: str = "auto",
    profile: bool | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Figures]:
    """Measure, then write the report; ``profile`` (default: if py-spy is installed) adds
    where a call's CPU goes."""
    if profile is None:
        profile = py_spy() is not None
    results: dict[str, Figures] = {}
    with (
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
    say("bare wrapper starts (spawn's CPU baseline)")
    bare_cpu_ms = [wrapper_cpu_ms() for _ in range(rounds)]
    load = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        _report(
            results,
            bare_cpu_ms,
            rounds,
            calls,
            sequential,
            per_size,
            str(server),
            sandbox,
            out.with_suffix(".png").name,
            load,
        )
    )
    plot = out.with_suffix(".png")  # beside the report, named after it
    _plot(results, plot)
    say(f"wrote {out} and {plot}")
    return results


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
        toolq_side = _Side(client.app, worker.hostname, worker.pid, CpuMeter(worker.pid))
        plain_side = _Side(plain_app, plain_worker.hostname, plain_worker.pid, plain_worker.cpu)
        senders: dict[str, tuple[_Side, Callable[[str], Any]]] = {
            "celery": (plain_side, functools.partial(_send, plain_app, bench_baseline.NOOP)),
            "toolq.noop": (toolq_side, functools.partial(_send, client.app, NOOP_TASK)),
            "tool": (toolq_side, lambda q: client.enqueue("noop", {}, queue=q)),
            "guarded": (toolq_side, lambda q: client.enqueue("noop_guarded", {}, queue=q)),
        }
        home = {"celery": plain_queue, "toolq.noop": queue, "tool": queue, "guarded": queue}
        names = SUBJECTS if mode == "warm" else SUBJECTS[:3]
        for name in names:
            _warm_up(functools.partial(senders[name][1], home[name]))
        for round_no in range(1, rounds + 1):
            say(f"mode {mode}: round {round_no}/{rounds}")
            for name in rotated(names, round_no):
                side, send = senders[name]
                subject = figures.subjects[name]
                cpu_before = side.cpu.seconds()
                subject.drain.append(_drain_throughput(side, redis_url, calls, send, drain_queue))
                subject.cpu_ms.append((side.cpu.seconds() - cpu_before) * 1000 / calls)
                rate, batch = _closed_loop(functools.partial(send, home[name]), calls)
                subject.closed.append(rate)
                subject.batch_p50_ms.append(percentile(sorted(batch), 50))
                subject.batch_p95_ms.append(percentile(sorted(batch), 95))
                latencies = _latencies(functools.partial(send, home[name]), sequential)
                subject.p50_ms.append(percentile(sorted(latencies), 50))
                subject.p95_ms.append(percentile(sorted(latencies), 95))
                paced = _latencies(
                    functools.partial(send, home[name]), PACED_CALLS, every_s=PACED_EVERY_S
                )
                subject.paced_p50_ms.append(percentile(sorted(paced), 50))
                subject.paced_p95_ms.append(percentile(sorted(paced), 95))
            for size in SIZES:
                payload = {"data": "x" * size}
                figures.baseline_sizes.setdefault(size, []).append(
                    _latencies(functools.partial(_noop, client, queue, payload), per_size)
                )
                figures.sizes.setdefault(size, []).append(
                    _latencies(
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
                        figures.bulk_plain.append(_closed_loop(plain_send, BULK_CALLS)[0])
                    else:
                        alone = kind == "single"
                        rate = _map_rate(client, queue, BULK_CALLS, 1 if alone else None)
                        (figures.bulk_single if alone else figures.bulk).append(rate)
        # After the rounds: sampling slows what it samples.
        profiled = names if mode == "warm" else ("tool",) if mode == "spawn" else ()
        for name in profiled if profile else ():
            say(f"mode {mode}: profiling {LABELS[name]}")
            side, send = senders[name]
            figures.profiles[name] = profile_subject(
                worker_pid=side.pid,
                drain=functools.partial(
                    _drain_throughput, side, redis_url, calls, send, drain_queue
                ),
                closed_loop=functools.partial(
                    _closed_loop, functools.partial(send, home[name]), calls
                ),
                calls=calls,
                redis_url=redis_url,
                tree_cpu_s=side.cpu.seconds,
            )
            if name in ("tool", "guarded"):
                tool_id = "noop" if name == "tool" else "noop_guarded"
                figures.profiles[name].wall = wall_breakdown(
                    functools.partial(_run, client, tool_id, queue),
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


class _Handle:
    def __init__(self, async_result: Any) -> None:
        self._async = async_result
        self.id = str(async_result.id)

    def result(self, timeout: float | None = None) -> Any:
        return self._async.get(timeout=timeout)


def _send(app: Celery, task: str, queue: str, payload: Any = None) -> _Handle:
    return _Handle(app.send_task(task, args=[payload], queue=queue))


def _noop(client: ToolClient, queue: str, payload: Any = None) -> _Handle:
    return _send(client.app, NOOP_TASK, queue, payload)


def _warm_up(send: Callable[[], Any]) -> None:
    for _ in range(10):
        _check(send().result(timeout=60))


def _run(client: ToolClient, tool_id: str, queue: str) -> Any:
    return client.enqueue(tool_id, {}, queue=queue).result(timeout=60)


def _check(outcome: Any) -> None:
    if hasattr(outcome, "ok") and not outcome.ok:
        raise RuntimeError(f"benchmark call failed: {outcome.error}")


def _drain_throughput(
    side: _Side, redis_url: str, calls: int, send: Callable[[str], Any], queue: str
) -> float:
    """Fill ``queue``, then let the worker drain it: calls per second, worker-side.

    While the worker drains, the producer only polls Redis every 50 ms (no result
    decoding), and the end is the last result's ``date_done`` as the worker stored it:
    the figure is the worker's, not the producer's (they share the machine's cores).
    """
    result_keys = [side.app.backend.get_key_for_task(send(queue).id) for _ in range(calls)]
    with redis.Redis.from_url(redis_url) as connection:
        started = time.time()
        side.app.control.add_consumer(queue, destination=[side.hostname], reply=True, timeout=5)
        deadline = time.monotonic() + 300
        while True:
            stored = connection.mget(result_keys)
            if all(stored):
                metas = [json.loads(item) for item in stored]
                if all(meta["status"] in READY for meta in metas):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not drain {calls} calls in 300 s")
            time.sleep(0.05)
        side.app.control.cancel_consumer(queue, destination=[side.hostname], reply=True, timeout=5)
        connection.delete(*result_keys)
    drop_queue(redis_url, queue)
    if any(meta["status"] != "SUCCESS" for meta in metas):
        raise RuntimeError("benchmark calls did not all succeed")
    for meta in metas:
        _check_envelope(meta["result"])
    finished = max(datetime.fromisoformat(meta["date_done"]).timestamp() for meta in metas)
    return calls / (finished - started)


def _closed_loop(send: Callable[[], Any], calls: int) -> tuple[float, list[float]]:
    """Enqueue ``calls``, then collect every result (in order): calls per second, producer
    included, and each call's ms from its enqueue to its result in hand."""
    started = time.perf_counter()
    sent = []
    for _ in range(calls):
        sent.append((time.perf_counter(), send()))
    latencies = []
    for enqueued, handle in sent:
        _check(handle.result(timeout=300))
        latencies.append((time.perf_counter() - enqueued) * 1000)
    return calls / (time.perf_counter() - started), latencies


def _map_rate(client: ToolClient, queue: str, calls: int, chunk_size: int | None) -> float:
    """``map()`` of ``calls`` trivial calls, enqueue to the last result: calls per second."""
    started = time.perf_counter()
    results = client.map("noop", [{}] * calls, queue=queue, chunk_size=chunk_size, wait=300)
    elapsed = time.perf_counter() - started
    if not all(result.ok for result in results):
        raise RuntimeError("benchmark calls did not all succeed")
    return calls / elapsed


def rotated(items: tuple[str, ...], round_no: int) -> tuple[str, ...]:
    """The subjects in round ``round_no``'s order (1-based): each takes the lead in turn."""
    shift = (round_no - 1) % len(items)
    return items[shift:] + items[:shift]


def _check_envelope(result: Any) -> None:
    if isinstance(result, dict) and result.get("status") == "error":
        raise RuntimeError(f"benchmark call failed: {result.get('error')}")


def _latencies(send: Callable[[], Any], count: int, every_s: float = 0.0) -> list[float]:
    """One caller's ``count`` calls, enqueue to result, ms; ``every_s``: a call starts at
    most that often (paced), else each as soon as the last one ended (back to back)."""
    values = []
    due = time.perf_counter()
    for _ in range(count):
        time.sleep(max(0.0, due - time.perf_counter()))
        started = time.perf_counter()
        due = started + every_s
        outcome = send().result(timeout=300)
        values.append((time.perf_counter() - started) * 1000)
        _check(outcome)
    return values


def peak_memory_while_busy(
    client: ToolClient,
    queue: str,
    worker_pid: int,
    calls_at_once: int = CONCURRENCY,
    ms: int = 2000,
) -> tuple[float, float]:
    """Peak RSS and peak PSS (MiB) of the worker tree while ``calls_at_once`` slow calls
    run."""
    calls = [client.enqueue("sleep", {"ms": ms}, queue=queue) for _ in range(calls_at_once)]
    peak_rss = peak_pss = 0.0
    deadline = time.monotonic() + ms / 1000 * 0.9
    while time.monotonic() < deadline:
        peak_rss = max(peak_rss, tree_rss_mib(worker_pid))
        peak_pss = max(peak_pss, tree_pss_mib(worker_pid))
        time.sleep(0.05)
    for call in calls:
        _check(call.result(timeout=60))
    return peak_rss, peak_pss


# -- process measurements -----------------------------------------------------------------


def count_commands(parts: WorkerParts) -> list[str]:
    """Commands this thread sends through the worker's Redis client, from now on."""
    sent: list[str] = []
    me = threading.get_ident()
    execute = parts.redis.execute_command

    def counted(*args: Any, **options: Any) -> Any:
        if threading.get_ident() == me:
            sent.append(str(args[0]))
        return execute(*args, **options)  # type: ignore[no-untyped-call]

    parts.redis.execute_command = counted  # type: ignore[method-assign]
    return sent


def _process_table() -> tuple[dict[int, list[int]], dict[int, list[str]]]:
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children, stats


def _tree(root_pid: int, children: dict[int, list[int]]) -> list[int]:
    pids, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def tree_rss_mib(root_pid: int) -> float:
    """Resident memory of ``root_pid`` and every process below it."""
    children, _ = _process_table()
    total = 0
    for pid in _tree(root_pid, children):
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


def tree_pss_mib(root_pid: int) -> float:
    """Proportional memory of ``root_pid`` and every process below it: a page shared by
    n processes counts 1/n in each (``/proc/PID/smaps_rollup``)."""
    children, _ = _process_table()
    total_kib = 0
    for pid in _tree(root_pid, children):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total_kib += int(line.split()[1])
                        break
        except (OSError, IndexError, ValueError):
            continue
    return total_kib / 1024


def process_tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process tree: its live members plus the children they reaped."""
    children, stats = _process_table()
    ticks = 0
    for pid in _tree(root_pid, children):
        fields = stats.get(pid)
        if fields:  # utime, stime, cutime, cstime (fields 14-17 of /proc/pid/stat)
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by a worker and everything it ever started.

    The /proc tree misses a descendant killed before its parent reaped it (a sandboxed
    Bun's time reaches the worker only through bwrap's waits), so where this machine
    allows it, the worker's tree is put in a cpuacct cgroup of its own (cgroup v1; new
    processes inherit it), whose counter sees every process. Else the /proc tree.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.group: Path | None = None
        root = Path("/sys/fs/cgroup/cpuacct")
        with contextlib.suppress(OSError):
            group = root / f"toolq-bench-{uuid.uuid4().hex[:8]}"
            group.mkdir()
            self.group = group
            children, _ = _process_table()
            for member in _tree(pid, children):
                with contextlib.suppress(OSError):
                    (group / "cgroup.procs").write_text(str(member))

    @property
    def source(self) -> str:
        return "cpuacct cgroup" if self.group is not None else "/proc tree"

    def seconds(self) -> float:
        if self.group is not None:
            return int((self.group / "cpuacct.usage").read_text()) / 1e9
        return process_tree_cpu_s(self.pid)

    def close(self) -> None:
        """Once the worker has exited: what is left (a lingering child) goes back to the
        parent group, so the cgroup can be removed."""
        if self.group is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for member in (self.group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.group.parent / "cgroup.procs").write_text(member)
                self.group.rmdir()
                return
            time.sleep(0.1)


NOOP_REQUEST = json.dumps(
    {"tool_id": "noop", "tool_exec_id": "bench", "input": {}, "config": {}, "env": {},
     "timeout_ms": 30000, "nonce": "n"}
).encode()  # fmt: skip
"""A spawn-mode request for the bench project's no-op tool, as the runner writes it."""


def wrapper_cpu_ms(runs: int = 100) -> float:
    """CPU per run of the wrapper started with Bun directly, one trivial call each."""
    bun = find_bun(None, PROJECT)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(runs):
        read_fd, write_fd = os.pipe()
        proc = subprocess.Popen(
            [
                str(bun),
                "--smol",
                "--no-install",
                "--no-env-file",
                str(WRAPPER),
                str(PROJECT / "entrypoint.ts"),
                str(write_fd),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,),
            cwd=PROJECT,
        )
        os.close(write_fd)
        proc.communicate(NOOP_REQUEST)
        while os.read(read_fd, 65536):
            pass
        os.close(read_fd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return used * 1000 / runs


# -- the report ----------------------------------------------------------------------------


def _med_or_dash(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def targets(results: dict[str, Figures], bare_cpu_ms: float) -> list[Target]:
    """Issue 15's targets, as far as the measured modes allow."""
    med = statistics.median
    found = []
    warm = results.get("warm")
    if warm is not None:
        plain = warm.subjects["celery"]
        for name, label in (("tool", "breaker off"), ("guarded", "breaker on")):
            one = warm.subjects[name]
            if not one.closed:
                continue
            ratio = med(one.closed) / med(plain.closed)
            found.append(
                Target(
                    f"warm tool ({label}), closed-loop throughput",
                    f"{ratio:.2f}x plain",
                    ">= 0.70x",
                    ratio >= 0.7,
                )
            )
            diff = med(one.p50_ms) - med(plain.p50_ms)
            found.append(
                Target(
                    f"warm tool ({label}), p50 latency",
                    f"{diff:+.2f} ms vs plain",
                    "<= +0.75 ms",
                    diff <= 0.75,
                )
            )
    if warm is not None and warm.bulk:
        ratio = med(warm.bulk) / med(warm.bulk_plain)
        found.append(
            Target(
                f"map() of {BULK_CALLS} trivial calls (warm), throughput",
                f"{ratio:.2f}x plain closed loop",
                ">= 2x",
                ratio >= 2,
            )
        )
    spawn = results.get("spawn")
    if spawn is not None and warm is not None:
        ratio = med(spawn.tool.p50_ms) / med(warm.tool.p50_ms)
        found.append(
            Target(
                "spawn tool, p50 latency, back to back",
                f"{ratio:.2f}x warm",
                "<= 3x",
                ratio <= 3,
            )
        )
        if spawn.tool.paced_p50_ms and warm.tool.paced_p50_ms:
            ratio = med(spawn.tool.paced_p50_ms) / med(warm.tool.paced_p50_ms)
            found.append(
                Target(
                    f"spawn tool, p50 latency, a call every {PACED_EVERY_S * 1000:.0f} ms",
                    f"{ratio:.2f}x warm",
                    "<= 3x",
                    ratio <= 3,
                )
            )
    if spawn is not None:
        ratio = med(spawn.tool.cpu_ms) / bare_cpu_ms
        found.append(
            Target(
                "spawn tool, CPU per call",
                f"{ratio:.2f}x a bare wrapper start",
                "<= 1.5x",
                ratio <= 1.5,
            )
        )
    if spawn is not None and warm is not None:
        # The line above counts Celery's and toolq's own per-call work too (warm's whole
        # CPU per call is about half a bare start); this one, what a fresh process adds.
        ratio = (med(spawn.tool.cpu_ms) - med(warm.tool.cpu_ms)) / bare_cpu_ms
        found.append(
            Target(
                "spawn tool, CPU a fresh process adds (spawn minus warm, per call)",
                f"{ratio:.2f}x a bare wrapper start",
                "<= 1.5x",
                ratio <= 1.5,
            )
        )
    for mode, f in results.items():
        peak = med(f.peak_pss_mib)
        found.append(
            Target(
                f"{mode}: {CONCURRENCY} slots at once, peak memory (PSS; summed RSS "
                f"{med(f.peak_rss_mib):.0f} MiB)",
                f"{peak:.0f} MiB",
                f"< {MEMORY_BUDGET_MIB} MiB",
                peak < MEMORY_BUDGET_MIB,
            )
        )
    return found


def _report(
    results: dict[str, Figures],
    bare_cpu_ms: list[float],
    rounds: int,
    calls: int,
    sequential: int,
    per_size: int,
    redis_version: str,
    sandbox: str,
    plot_name: str,
    load: tuple[float, float, float],
) -> str:
    med = statistics.median
    lines = [
        "# toolq benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        f"`{_command(results, rounds, calls, sandbox)}` (`make bench`); every figure is the "
        "median of the "
        "rounds, measured in interleaved rounds (the order rotates). Baselines are measured "
        "in the same run: a **plain Celery app's** no-op task (`cli/bench_baseline.py`: "
        "no toolq settings, late acks, prefetch 1, its own worker process), `toolq.noop` on "
        "toolq's own worker, and Bun starting the wrapper directly.",
        "",
        f"- machine: {_cpu()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB; load average "
        f"when the run ended {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)",
        f"- Python {platform.python_version()}, Celery {celery.__version__}, "
        f"Bun {_bun_version()}, Redis {redis_version}",
        f"- workers: threads pool, {CONCURRENCY} slots, prefetch 1 per slot, late acks, "
        f"`runtime.sandbox: {sandbox}`; producer, workers and Redis share the machine",
        "",
        "## Trivial call: toolq against plain Celery",
        "",
        f"Drain: a queue pre-filled with {calls} calls, drained by the worker (calls/s, "
        f"worker-side). Closed loop: enqueue {calls} calls, then collect every result "
        f"(calls/s, producer included). Latency: {sequential} sequential calls, one caller, "
        "enqueue to result, back to back; paced: "
        f"{PACED_CALLS} calls, one every {PACED_EVERY_S * 1000:.0f} ms. Worker CPU: all "
        "the serving worker ran (Celery, toolq, Bun; "
        f"read from a {next(iter(results.values())).cpu_source}) during the drain, per "
        "call. Ratios are against the plain Celery no-op.",
        "",
        "| mode | subject | drain /s | vs plain | closed loop /s | vs plain | p50 ms | "
        "p95 ms | p50 vs plain | paced p50 ms | paced p95 ms | worker CPU ms/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, f in results.items():
        plain = f.subjects["celery"]
        for name in SUBJECTS:
            one = f.subjects[name]
            if not one.drain:
                continue
            label = LABELS[name] if name != "tool" else f"**tool ({mode})**"
            lines.append(
                f"| {mode} | {label} | {med(one.drain):.0f} | "
                f"{med(one.drain) / med(plain.drain):.2f}x | {med(one.closed):.0f} | "
                f"{med(one.closed) / med(plain.closed):.2f}x | {med(one.p50_ms):.2f} | "
                f"{med(one.p95_ms):.2f} | {med(one.p50_ms) - med(plain.p50_ms):+.2f} ms | "
                f"{_med_or_dash(one.paced_p50_ms)} | {_med_or_dash(one.paced_p95_ms)} | "
                f"{med(one.cpu_ms):.2f} |"
            )
    if "spawn" in results and "warm" in results:
        ratio = med(results["warm"].tool.drain) / med(results["spawn"].tool.drain)
        lines += ["", f"Warm over spawn drain throughput: **{ratio:.1f}x**."]
    lines += [
        "",
        f"Latency inside the closed loop ({calls} calls in flight at once, enqueue to result "
        "in hand, collected in order):",
        "",
        "| mode | subject | batch p50 ms | batch p95 ms | p50 vs plain |",
        "|---|---|---|---|---|",
    ]
    for mode, f in results.items():
        plain = f.subjects["celery"]
        for name in SUBJECTS:
            one = f.subjects[name]
            if not one.batch_p50_ms:
                continue
            lines.append(
                f"| {mode} | {LABELS[name]} | {med(one.batch_p50_ms):.1f} | "
                f"{med(one.batch_p95_ms):.1f} | "
                f"{med(one.batch_p50_ms) / med(plain.batch_p50_ms):.2f}x |"
            )
    warm = results.get("warm")
    if warm is not None and warm.bulk:
        plain_rate, chunked = med(warm.bulk_plain), med(warm.bulk)
        lines += [
            "",
            f"## Bulk: `map()` of {BULK_CALLS} calls",
            "",
            f'`ToolClient.map("noop", [{{}}] * {BULK_CALLS})` on the warm worker, enqueue to '
            "the last result in hand (producer included), against the plain Celery no-op's "
            f"closed loop of {BULK_CALLS} calls (enqueue each, then `get()` each) in the same "
            "round. `map()` sends chunks of up to 100 calls per message, each call keeping "
            "its own id and result; `chunk_size=1` sends one message per call.",
            "",
            "| subject | calls/s | vs plain |",
            "|---|---|---|",
            f"| plain Celery no-op, closed loop | {plain_rate:.0f} | 1.00x |",
            f"| **toolq `map()`, chunks** | {chunked:.0f} | {chunked / plain_rate:.2f}x |",
            f"| toolq `map(chunk_size=1)` | {med(warm.bulk_single):.0f} | "
            f"{med(warm.bulk_single) / plain_rate:.2f}x |",
        ]
    lines += [
        "",
        "## Targets (issue 15)",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for target in targets(results, med(bare_cpu_ms)):
        lines.append(
            f"| {target.name} | {target.value} | {target.goal} | "
            f"{'yes' if target.met else '**no**'} |"
        )
    if "spawn" in results:
        lines += [
            "",
            "Spawn latency back to back is a throughput test: each call sets off the start of "
            "its replacement (the worker CPU per call above), so one caller without pauses "
            "uses processes faster than the cores can start them and most calls wait for a "
            f"start. Paced (a call every {PACED_EVERY_S * 1000:.0f} ms), a call finds a "
            "process started ahead of it, which is what spawn mode promises.",
        ]
    lines += [
        "",
        "## Memory and CPU",
        "",
        f"Peak memory of the whole worker tree with {CONCURRENCY} calls running at once "
        f"(budget {MEMORY_BUDGET_MIB} MiB): PSS, the memory the tree holds (a page shared "
        "by n processes counts 1/n in each: what a container's limit is charged), and the "
        "sum of RSS, which counts Bun's shared code once per process. "
        "CPU per call: the worker tree's CPU while it "
        "drains trivial tool calls (Celery, toolq, Bun), against starting the wrapper with "
        f"Bun directly ({med(bare_cpu_ms):.2f} ms per start).",
        "",
        "| mode | peak PSS MiB | of budget | summed RSS MiB | CPU per call ms | "
        "vs bare wrapper start |",
        "|---|---|---|---|---|---|",
    ]
    for mode, f in results.items():
        lines.append(
            f"| {mode} | {med(f.peak_pss_mib):.0f} | "
            f"{med(f.peak_pss_mib) / MEMORY_BUDGET_MIB:.0%} | {med(f.peak_rss_mib):.0f} | "
            f"{med(f.tool.cpu_ms):.2f} | {med(f.tool.cpu_ms) / med(bare_cpu_ms):.2f}x |"
        )
    lines += [
        "",
        "## Input sizes (the seed guide's 1 KB to 1 MB)",
        "",
        f"{per_size} sequential calls per size and round: a tool that returns the input's "
        "length, against toolq's no-op task carrying the same payload.",
        "",
        "| mode | input | tool p50 ms | tool p95 ms | no-op p50 ms | ratio p50 |",
        "|---|---|---|---|---|---|",
    ]
    for mode, f in results.items():
        for size in SIZES:
            tool, base = _pooled(f.sizes[size]), _pooled(f.baseline_sizes[size])
            lines.append(
                f"| {mode} | {_size(size)} | {percentile(tool, 50):.2f} | "
                f"{percentile(tool, 95):.2f} | {percentile(base, 50):.2f} | "
                f"{percentile(tool, 50) / percentile(base, 50):.2f}x |"
            )
    lines += ["", f"![closed-loop throughput; latency by input size]({plot_name})", ""]
    breakdowns = {
        (LABELS[name] if name in ("celery", "toolq.noop") else f"{LABELS[name]} ({mode})"): (
            breakdown
        )
        for mode, f in results.items()
        for name, breakdown in f.profiles.items()
    }
    if breakdowns:
        command = _command(results, rounds, calls, sandbox)
        lines += [*profile_report(breakdowns, calls, command), ""]
    return "\n".join(lines)


def _command(results: dict[str, Figures], rounds: int, calls: int, sandbox: str) -> str:
    """The command line that produced a report."""
    line = f"toolq bench --modes {','.join(results)} --rounds {rounds} --calls {calls}"
    return line + ("" if sandbox == "auto" else f" --sandbox {sandbox}")


def _pooled(rounds: list[list[float]]) -> list[float]:
    return sorted(value for values in rounds for value in values)


def _plot(results: dict[str, Figures], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (bars, ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    med = statistics.median
    width = 0.8 / len(SUBJECTS)
    for index, name in enumerate(SUBJECTS):
        positions = [mode_no + (index - 1) * width for mode_no in range(len(results))]
        values = [med(f.subjects[name].closed or [0.0]) for f in results.values()]
        bars.bar(positions, values, width, label=LABELS[name])
    bars.set_xticks(range(len(results)), [f"{mode} worker" for mode in results])
    bars.set_ylabel("calls/s, closed loop (producer included)")
    bars.set_title("trivial call against a plain Celery no-op")
    bars.legend()
    bars.grid(True, axis="y", alpha=0.3)
    xs = [size / 1024 for size in SIZES]
    for mode, f in results.items():
        for pct, style in ((50, "-o"), (95, "--o")):
            ax.plot(
                xs,
                [percentile(_pooled(f.sizes[s]), pct) for s in SIZES],
                style,
                label=f"{mode} p{pct}",
            )
    base = next(iter(results.values()))
    ax.plot(
        xs,
        [percentile(_pooled(base.baseline_sizes[s]), 50) for s in SIZES],
        ":k",
        label="toolq.noop p50",
    )
    ax.set_xscale("log")
    ax.set_xlabel("input size (KiB)")
    ax.set_ylabel("enqueue to result (ms)")
    ax.set_title("toolq latency by input size")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _size(size: int) -> str:
    return f"{size // 1024} KB" if size < 1024 * 1024 else f"{size // (1024 * 1024)} MB"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


def _bun_version() -> str:
    bun = find_bun(None, PROJECT)
    return subprocess.run([str(bun), "--version"], capture_output=True, text=True).stdout.strip()
