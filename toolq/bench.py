"""`toolq bench` / `make bench`: toolq measured against its baselines in the same run.

- Throughput and latency of a trivial tool against a Celery no-op task
  (``toolq.noop``) through the same Redis, on the same worker with the same settings.
  Throughput is measured by draining a pre-filled queue, so the producer (on the same
  cores) does not set the pace.
- The seed guide's input sizes (1 KB to 1 MB) against a no-op task carrying the same
  payload.
- Memory: the whole worker tree (worker, reaper, Bun processes) with
  ``max_concurrent_tools`` calls running at once, against the seed guide's 512 MiB.
- CPU per call in spawn mode against starting the wrapper with Bun directly.

Every figure is the median of several rounds, reported with the ratio to its baseline.
Results go to ``bench/RESULTS.md`` and a PNG of latency percentiles by input size.
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
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import celery
import redis

from toolq.config.celery_app import NOOP_TASK
from toolq.config.loader import load_settings
from toolq.devredis import drop_queue, ensure_redis
from toolq.loadtest import percentile
from toolq.producers.client import ToolClient
from toolq.workers.process import WorkerProcess
from toolq.workers.runtime.bun import WRAPPER, find_bun

PROJECT = Path(__file__).resolve().parent / "projects" / "bench"
"""Shipped inside the package: `toolq bench` works from an installed wheel too."""
SIZES = (1024, 10 * 1024, 100 * 1024, 1024 * 1024)
CONCURRENCY = 10
MEMORY_BUDGET_MIB = 512
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


@dataclass
class Figures:
    """One runtime mode's measurements, one entry per round."""

    throughput: list[float] = field(default_factory=list)
    baseline_throughput: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    baseline_latency_ms: list[float] = field(default_factory=list)
    sizes: dict[int, list[list[float]]] = field(default_factory=dict)
    baseline_sizes: dict[int, list[list[float]]] = field(default_factory=dict)
    peak_rss_mib: list[float] = field(default_factory=list)
    cpu_per_call_ms: list[float] = field(default_factory=list)


def run_bench(
    *,
    modes: Sequence[str] = ("spawn", "warm"),
    rounds: int = 3,
    calls: int = 500,
    sequential: int = 100,
    per_size: int = 15,
    out: Path = Path("bench") / "RESULTS.md",
    sandbox: str = "auto",
    say: Callable[[str], None] = print,
) -> dict[str, Figures]:
    results: dict[str, Figures] = {}
    with ensure_redis(quiet=True) as redis_url:
        for mode in modes:
            say(f"mode {mode}: starting a worker")
            results[mode] = _bench_mode(
                mode,
                redis_url,
                rounds=rounds,
                calls=calls,
                sequential=sequential,
                per_size=per_size,
                sandbox=sandbox,
                say=say,
            )
        server = redis.Redis.from_url(redis_url).info("server").get("redis_version", "?")
    say("bare wrapper starts (spawn's CPU baseline)")
    bare_cpu_ms = [wrapper_cpu_ms() for _ in range(rounds)]
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
        )
    )
    plot = out.with_suffix(".png")  # beside the report, named after it
    _plot(results, plot)
    say(f"wrote {out} and {plot}")
    return results


def _bench_mode(
    mode: str,
    redis_url: str,
    *,
    rounds: int,
    calls: int,
    sequential: int,
    per_size: int,
    sandbox: str,
    say: Callable[[str], None],
) -> Figures:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = {"TOOLQ_RUNTIME__MODE": mode, "TOOLQ_RUNTIME__SANDBOX": sandbox}
    figures = Figures()
    with bench_worker(PROJECT / "compozy.yaml", redis_url, queue, env, concurrency=CONCURRENCY) as (
        client,
        worker,
    ):
        drain = functools.partial(_drain_throughput, client, worker.hostname, redis_url, calls)
        _warm_up(client, queue)
        for round_no in range(1, rounds + 1):
            say(f"mode {mode}: round {round_no}/{rounds}")
            figures.baseline_throughput.append(drain(lambda q: _noop(client, q)))
            cpu_before = process_tree_cpu_s(worker.pid)
            figures.throughput.append(drain(lambda q: client.enqueue("noop", {}, queue=q)))
            figures.cpu_per_call_ms.append(
                (process_tree_cpu_s(worker.pid) - cpu_before) * 1000 / calls
            )
            figures.baseline_latency_ms.append(
                statistics.median(_latencies(lambda: _noop(client, queue), sequential))
            )
            figures.latency_ms.append(
                statistics.median(
                    _latencies(lambda: client.enqueue("noop", {}, queue=queue), sequential)
                )
            )
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
            figures.peak_rss_mib.append(peak_rss_while_busy(client, queue, worker.pid))
    return figures


@contextlib.contextmanager
def bench_worker(
    config: Path, redis_url: str, queue: str, env: dict[str, str], **worker_options: Any
) -> Iterator[tuple[ToolClient, WorkerProcess]]:
    """A client and a running worker on a private queue, stopped and dropped afterwards."""
    settings = load_settings(
        config, environ=env, overrides={"redis_url": redis_url, "queue": queue}
    )
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


def _noop(client: ToolClient, queue: str, payload: Any = None) -> _Handle:
    return _Handle(client.app.send_task(NOOP_TASK, args=[payload], queue=queue))


def _warm_up(client: ToolClient, queue: str) -> None:
    for _ in range(10):
        _noop(client, queue).result(timeout=60)
        assert client.enqueue("noop", {}, queue=queue).result(timeout=60).ok


def _check(outcome: Any) -> None:
    if hasattr(outcome, "ok") and not outcome.ok:
        raise RuntimeError(f"benchmark call failed: {outcome.error}")


def _drain_throughput(
    client: ToolClient, hostname: str, redis_url: str, calls: int, send: Callable[[str], Any]
) -> float:
    """Fill a fresh queue, then let the worker drain it: calls per second, worker-side.

    While the worker drains, the producer only polls Redis every 50 ms (no result
    decoding), and the end is the last result's ``date_done`` as the worker stored it:
    the figure is the worker's, not the producer's (they share the machine's cores).
    """
    queue = f"drain-{uuid.uuid4().hex[:8]}"
    result_keys = [client.app.backend.get_key_for_task(send(queue).id) for _ in range(calls)]
    with redis.Redis.from_url(redis_url) as connection:
        started = time.time()
        client.app.control.add_consumer(queue, destination=[hostname], reply=True, timeout=5)
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
    client.app.control.cancel_consumer(queue, destination=[hostname], reply=True, timeout=5)
    drop_queue(redis_url, queue)
    if any(meta["status"] != "SUCCESS" for meta in metas):
        raise RuntimeError("benchmark calls did not all succeed")
    for meta in metas:
        _check_envelope(meta["result"])
    finished = max(datetime.fromisoformat(meta["date_done"]).timestamp() for meta in metas)
    return calls / (finished - started)


def _check_envelope(result: Any) -> None:
    if isinstance(result, dict) and result.get("status") == "error":
        raise RuntimeError(f"benchmark call failed: {result.get('error')}")


def _latencies(send: Callable[[], Any], count: int) -> list[float]:
    values = []
    for _ in range(count):
        started = time.perf_counter()
        outcome = send().result(timeout=300)
        values.append((time.perf_counter() - started) * 1000)
        _check(outcome)
    return values


def peak_rss_while_busy(
    client: ToolClient,
    queue: str,
    worker_pid: int,
    calls_at_once: int = CONCURRENCY,
    ms: int = 2000,
) -> float:
    """Peak RSS (MiB) of the worker tree while ``calls_at_once`` slow calls run."""
    calls = [client.enqueue("sleep", {"ms": ms}, queue=queue) for _ in range(calls_at_once)]
    peak = 0.0
    deadline = time.monotonic() + ms / 1000 * 0.9
    while time.monotonic() < deadline:
        peak = max(peak, tree_rss_mib(worker_pid))
        time.sleep(0.05)
    for call in calls:
        _check(call.result(timeout=60))
    return peak


# -- process measurements -----------------------------------------------------------------


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


def process_tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process tree: its live members plus the children they reaped."""
    children, stats = _process_table()
    ticks = 0
    for pid in _tree(root_pid, children):
        fields = stats.get(pid)
        if fields:  # utime, stime, cutime, cstime (fields 14-17 of /proc/pid/stat)
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def wrapper_cpu_ms(runs: int = 100) -> float:
    """CPU per run of the wrapper started with Bun directly, one trivial call each."""
    bun = find_bun(None, PROJECT)
    request = json.dumps(
        {
            "tool_id": "noop",
            "tool_exec_id": "bench",
            "input": {},
            "config": {},
            "env": {},
            "timeout_ms": 30000,
            "nonce": "n",
        }
    ).encode()
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
        proc.communicate(request)
        while os.read(read_fd, 65536):
            pass
        os.close(read_fd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return used * 1000 / runs


# -- the report ----------------------------------------------------------------------------


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
) -> str:
    med = statistics.median
    lines = [
        "# toolq benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        f"`toolq bench --rounds {rounds}` (`make bench`); every figure is the median of the "
        "rounds. Baselines are measured in the same run: a Celery no-op task (`toolq.noop`) "
        "through the same Redis on the same worker, and Bun starting the wrapper directly.",
        "",
        f"- machine: {_cpu()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB",
        f"- Python {platform.python_version()}, Celery {celery.__version__}, "
        f"Bun {_bun_version()}, Redis {redis_version}",
        f"- worker: threads pool, {CONCURRENCY} slots, prefetch 1 per slot, late acks, "
        f"`runtime.sandbox: {sandbox}`; producer, worker and Redis share the machine",
        "",
        "## Trivial tool: throughput and latency",
        "",
        f"Throughput: a queue pre-filled with {calls} calls, drained by the worker (calls/s). "
        f"Latency: {sequential} sequential calls, one caller, enqueue to result (median).",
        "",
        "| mode | tool calls/s | no-op tasks/s | ratio | tool p50 ms | no-op p50 ms | diff ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, f in results.items():
        lines.append(
            f"| {mode} | {med(f.throughput):.0f} | {med(f.baseline_throughput):.0f} | "
            f"{med(f.throughput) / med(f.baseline_throughput):.2f}x | "
            f"{med(f.latency_ms):.2f} | {med(f.baseline_latency_ms):.2f} | "
            f"{med(f.latency_ms) - med(f.baseline_latency_ms):+.2f} |"
        )
    if "spawn" in results and "warm" in results:
        ratio = med(results["warm"].throughput) / med(results["spawn"].throughput)
        lines += ["", f"Warm over spawn throughput: **{ratio:.1f}x**."]
    lines += [
        "",
        "## Memory and CPU",
        "",
        f"Peak RSS of the whole worker tree with {CONCURRENCY} calls running at once "
        f"(budget {MEMORY_BUDGET_MIB} MiB). CPU per call: the worker tree's CPU during the "
        "throughput runs (Celery, toolq, Bun) divided by the calls, against starting the "
        f"wrapper with Bun directly ({med(bare_cpu_ms):.2f} ms per start).",
        "",
        "| mode | peak RSS MiB | of budget | CPU per call ms | vs bare wrapper start |",
        "|---|---|---|---|---|",
    ]
    for mode, f in results.items():
        lines.append(
            f"| {mode} | {med(f.peak_rss_mib):.0f} | "
            f"{med(f.peak_rss_mib) / MEMORY_BUDGET_MIB:.0%} | {med(f.cpu_per_call_ms):.2f} | "
            f"{med(f.cpu_per_call_ms) / med(bare_cpu_ms):.2f}x |"
        )
    lines += [
        "",
        "## Input sizes (the seed guide's 1 KB to 1 MB)",
        "",
        f"{per_size} sequential calls per size and round: a tool that returns the input's "
        "length, against a no-op task carrying the same payload.",
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
    lines += ["", f"![latency by input size]({plot_name})", ""]
    return "\n".join(lines)


def _pooled(rounds: list[list[float]]) -> list[float]:
    return sorted(value for values in rounds for value in values)


def _plot(results: dict[str, Figures], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
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
        label="Celery no-op p50",
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
