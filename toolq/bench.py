"""`toolq bench` / `make bench`: toolq measured against a baseline in the same run.

The baseline is a Celery no-op task (``toolq.noop``) through the same Redis, on the
same worker with the same settings: whatever a tool call costs above it is toolq's
(and Bun's). Every figure is the median of several rounds, reported as a ratio to
the baseline measured alongside it. Results go to ``bench/RESULTS.md`` (and a PNG of
latency percentiles by input size).
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
import redis

from toolq.config.celery_app import NOOP_TASK
from toolq.config.loader import load_settings
from toolq.devredis import drop_queue, ensure_redis
from toolq.loadtest import percentile
from toolq.producers.client import ToolClient
from toolq.workers.bun import find_bun
from toolq.workers.process import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "bench" / "tools"
SIZES = (1024, 10 * 1024, 100 * 1024, 1024 * 1024)


@dataclass
class Figures:
    """Per mode: medians over rounds of each measurement."""

    throughput: list[float] = field(default_factory=list)
    baseline_throughput: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    baseline_latency_ms: list[float] = field(default_factory=list)
    sizes: dict[int, list[list[float]]] = field(default_factory=dict)
    baseline_sizes: dict[int, list[list[float]]] = field(default_factory=dict)


def run_bench(
    *,
    modes: Sequence[str] = ("spawn",),
    rounds: int = 3,
    calls: int = 200,
    sequential: int = 50,
    per_size: int = 15,
    out: Path = ROOT / "bench" / "RESULTS.md",
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
                say=say,
            )
        server = redis.Redis.from_url(redis_url).info("server").get("redis_version", "?")
    out.write_text(_report(results, rounds, calls, sequential, per_size, str(server)))
    _plot(results, out.with_name("latency_by_size.png"))
    say(f"wrote {out} and {out.with_name('latency_by_size.png')}")
    return results


def _bench_mode(
    mode: str,
    redis_url: str,
    *,
    rounds: int,
    calls: int,
    sequential: int,
    per_size: int,
    say: Callable[[str], None],
) -> Figures:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    config = PROJECT / "compozy.yaml"
    env = {"TOOLQ_RUNTIME__MODE": mode} if mode != "spawn" else {}
    settings = load_settings(
        config, environ=env, overrides={"redis_url": redis_url, "queue": queue}
    )
    figures = Figures()
    with (
        ToolClient(settings) as client,
        WorkerProcess(
            config=config, redis_url=redis_url, queues=[queue], loglevel="WARNING", env=env
        ) as worker,
    ):
        worker.start(client.app)
        _warm_up(client, queue)
        for round_no in range(1, rounds + 1):
            say(f"mode {mode}: round {round_no}/{rounds}")
            figures.baseline_throughput.append(_throughput(lambda: _noop(client, queue), calls))
            figures.throughput.append(
                _throughput(lambda: client.enqueue("noop", {}, queue=queue), calls)
            )
            figures.baseline_latency_ms.append(
                _median_latency(lambda: _noop(client, queue), sequential)
            )
            figures.latency_ms.append(
                _median_latency(lambda: client.enqueue("noop", {}, queue=queue), sequential)
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
    drop_queue(redis_url, queue)
    return figures


def _noop(client: ToolClient, queue: str, payload: Any = None) -> Any:
    async_result = client.app.send_task(NOOP_TASK, args=[payload], queue=queue)

    class Handle:
        def result(self, timeout: float | None = None) -> Any:
            return async_result.get(timeout=timeout)

    return Handle()


def _warm_up(client: ToolClient, queue: str) -> None:
    for _ in range(5):
        _noop(client, queue).result(timeout=60)
        assert client.enqueue("noop", {}, queue=queue).result(timeout=60).ok


def _throughput(send: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    handles = [send() for _ in range(calls)]
    for handle in handles:
        outcome = handle.result(timeout=300)
        if hasattr(outcome, "ok") and not outcome.ok:
            raise RuntimeError(f"benchmark call failed: {outcome.error}")
    return calls / (time.perf_counter() - started)


def _latencies(send: Callable[[], Any], count: int) -> list[float]:
    values = []
    for _ in range(count):
        started = time.perf_counter()
        outcome = send().result(timeout=300)
        values.append((time.perf_counter() - started) * 1000)
        if hasattr(outcome, "ok") and not outcome.ok:
            raise RuntimeError(f"benchmark call failed: {outcome.error}")
    return values


def _median_latency(send: Callable[[], Any], count: int) -> float:
    return statistics.median(_latencies(send, count))


# -- the report ----------------------------------------------------------------------------


def _report(
    results: dict[str, Figures],
    rounds: int,
    calls: int,
    sequential: int,
    per_size: int,
    redis_version: str,
) -> str:
    med = statistics.median
    lines = [
        "# toolq benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `toolq bench` "
        f"(`make bench`): {rounds} rounds, medians of the rounds. The baseline is a Celery "
        "no-op task (`toolq.noop`) through the same Redis, on the same worker, in the same run.",
        "",
        f"- machine: {_cpu()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB",
        f"- Python {platform.python_version()}, Celery {celery.__version__}, "
        f"Bun {_bun_version()}, Redis {redis_version}",
        "- worker: threads pool, max_concurrent_tools 10, prefetch 1 per slot, late acks",
        "",
        "## Throughput and latency of a trivial tool",
        "",
        f"Throughput: {calls} calls enqueued at once, calls/s until the last result. "
        f"Latency: {sequential} sequential calls, enqueue to result, median.",
        "",
        "| mode | tool calls/s | no-op tasks/s | ratio | tool p50 ms | no-op p50 ms | diff ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, f in results.items():
        lines.append(
            f"| {mode} | {med(f.throughput):.0f} | {med(f.baseline_throughput):.0f} | "
            f"{med(f.throughput) / med(f.baseline_throughput):.2f}x | {med(f.latency_ms):.2f} | "
            f"{med(f.baseline_latency_ms):.2f} | "
            f"{med(f.latency_ms) - med(f.baseline_latency_ms):+.2f} |"
        )
    if "spawn" in results and len(results) > 1:
        spawn = med(results["spawn"].throughput)
        for mode, f in results.items():
            if mode != "spawn":
                lines.append(f"\n{mode} vs spawn throughput: {med(f.throughput) / spawn:.1f}x")
    lines += [
        "",
        "## Input sizes (the seed guide's 1 KB to 1 MB)",
        "",
        f"{per_size} sequential calls per size and round; a tool that returns the input's "
        "length against a no-op task carrying the same payload.",
        "",
        "| mode | input | tool p50 ms | tool p95 ms | no-op p50 ms | ratio p50 |",
        "|---|---|---|---|---|---|",
    ]
    for mode, f in results.items():
        for size in SIZES:
            tool = _pooled(f.sizes[size])
            base = _pooled(f.baseline_sizes[size])
            lines.append(
                f"| {mode} | {_size(size)} | {percentile(tool, 50):.2f} | "
                f"{percentile(tool, 95):.2f} | {percentile(base, 50):.2f} | "
                f"{percentile(tool, 50) / percentile(base, 50):.2f}x |"
            )
    lines += ["", "![latency by input size](latency_by_size.png)", ""]
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
    ax.set_ylabel("enqueue → result (ms)")
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
