"""Where one trivial call's time goes, from a profile, not a guess (``toolq bench``).

For each subject of the bench — the trivial tool (warm, with and without toolq's circuit
breaker; spawn), ``toolq.noop`` and the plain Celery no-op (:mod:`toolq.cli.bench_baseline`) —
each on its worker:

- **worker**: py-spy samples the worker process (on-CPU samples only, without pausing
  it) while it drains a pre-filled queue; each sample goes to the layer of the innermost
  frame that decides it (stdlib frames count for their caller: ``socket`` under redis-py
  is redis-py, ``selectors`` under toolq's pump is toolq's runtime); the layers' shares
  split the worker's own CPU per call, read from ``/proc``;
- **Bun**: the CPU of everything the worker started (its cpuacct cgroup, else its /proc
  tree) minus the worker's own, per call;
- **producer**: CPU per call of a closed loop (enqueue N, then collect every result),
  split by the layers of a cProfile of a second closed loop (a function's own time goes
  to its dominant caller chain's layer);
- **Redis**: the server's ``used_cpu_*`` per call during the unprofiled closed loop
  (includes any other client's load).
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import pstats
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

import toolq
import toolq.config
import toolq.producers
import toolq.workers
import toolq.workers.runtime

LAYERS = (
    "Celery/kombu",
    "redis-py, for Celery",
    "redis-py, for toolq",
    "JSON",
    "toolq handler",
    "toolq runtime (Bun pipes)",
    "other Python",
)
_STDLIB = sysconfig.get_paths()["stdlib"]
_RUNTIME = str(Path(toolq.workers.runtime.__file__).parent)
_TOOLQ = tuple(
    str(Path(module.__file__ or "").parent)
    for module in (toolq, toolq.config, toolq.producers, toolq.workers)
)
_CELERY = ("/celery/", "/kombu/", "/billiard/", "/vine/", "/amqp/", "/click/")


def layer_of_file(path: str) -> str | None:
    """The layer a frame in ``path`` decides, or None for a frame that counts for its
    caller (the stdlib, builtins)."""
    if "/json/" in path or path.endswith("kombu/utils/json.py"):
        return "JSON"
    if "/redis/" in path:
        return "redis-py"
    if any(part in path for part in _CELERY):
        return "Celery/kombu"
    if path.startswith(_RUNTIME):
        return "toolq runtime (Bun pipes)"
    if path.startswith(_TOOLQ) or "/prometheus_client/" in path or "/pydantic" in path:
        return "toolq handler"
    if path.startswith(_STDLIB) or path.startswith("<") or path == "~":
        return None
    return "other Python"


def _owner(layers: Iterator[str | None]) -> str:
    """Whose Redis call it is: the first caller above redis-py that is Celery's or toolq's."""
    for layer in layers:
        if layer is not None and layer.startswith("toolq"):
            return "redis-py, for toolq"
        if layer == "Celery/kombu":
            break
    return "redis-py, for Celery"


def layer_of_stack(frames: list[str]) -> str:
    """A py-spy stack (root first, ``func (path:line)`` each): its innermost deciding layer
    (redis-py split by whose call it is)."""
    layers = [layer_of_file(frame.rpartition(" (")[2].rsplit(":", 1)[0]) for frame in frames]
    for depth in range(len(layers) - 1, -1, -1):
        layer = layers[depth]
        if layer == "redis-py":
            return _owner(iter(reversed(layers[:depth])))
        if layer is not None:
            return layer
    return "other Python"


def layers_of_samples(raw: str) -> Counter[str]:
    """Sample counts per layer from py-spy's ``--format raw`` output."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[layer_of_stack(stack.split(";"))] += int(count)
    return counts


def layers_of_profile(stats: pstats.Stats) -> Counter[str]:
    """cProfile own time per layer; a stdlib or builtin function's time goes to the layer
    of its dominant caller chain."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]

    def chain(func: Any) -> Iterator[str | None]:
        """The layers of ``func`` and of its dominant callers, innermost first."""
        for _ in range(16):
            yield layer_of_file(func[0])
            callers = table.get(func, (0, 0, 0, 0, {}))[4]
            if not callers:
                return
            func = max(callers.items(), key=lambda item: item[1][3])[0]

    def decide(func: Any) -> str:
        layers = chain(func)
        for layer in layers:
            if layer == "redis-py":
                return _owner(layers)
            if layer is not None:
                return layer
        return "other Python"

    seconds: Counter[str] = Counter()
    for func, (_, _, own, _, _) in table.items():
        seconds[decide(func)] += own
    return seconds


WALL = (
    "enqueue to handler start (producer, Redis, Celery delivery)",
    "handler, outside the runtime (toolq, Celery task)",
    "runtime: Bun's pipes, process and tool",
    "handler end to result in the producer (result store, Redis, decoding)",
)


def wall_breakdown(call: Callable[[], Any], count: int) -> dict[str, float]:
    """Median wall ms of each stretch of one sequential call, from the envelope's own
    timestamps (``enqueued_at``, ``started_at``, ``finished_at``, ``total_time``)."""
    stretches: dict[str, list[float]] = {name: [] for name in WALL}
    for _ in range(count):
        result = call()
        received = time.time()
        meta = result.metadata
        handler_ms = (meta["finished_at"] - meta["started_at"]) * 1000
        runtime_ms = float(meta["total_time"])
        values = (
            (meta["started_at"] - meta["enqueued_at"]) * 1000,
            max(0.0, handler_ms - runtime_ms),
            runtime_ms,
            (received - meta["finished_at"]) * 1000,
        )
        for name, value in zip(WALL, values, strict=True):
            stretches[name].append(value)
    return {name: statistics.median(values) for name, values in stretches.items()}


@dataclass
class Breakdown:
    """CPU ms per call by place and layer, for one subject."""

    producer: dict[str, float] = field(default_factory=dict)
    worker: dict[str, float] = field(default_factory=dict)
    bun_ms: float = 0.0
    redis_ms: float = 0.0
    wall: dict[str, float] = field(default_factory=dict)
    """Median wall ms of one sequential call's stretches (tool calls only)."""

    @property
    def total_ms(self) -> float:
        return sum(self.producer.values()) + sum(self.worker.values()) + self.bun_ms + self.redis_ms


def py_spy() -> str | None:
    """The py-spy binary (the ``dev`` extra installs it beside Python), if any."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


@contextlib.contextmanager
def sampling(pid: int, rate: int = 200) -> Iterator[Callable[[], str]]:
    """py-spy records ``pid`` while the block runs; the callable returns its raw output."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy, or the dev extra)")
    out = Path(tempfile.mkdtemp(prefix="toolq-pyspy-")) / "raw.txt"
    proc = subprocess.Popen(
        [
            *(binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"),
            *("--nonblocking", "--full-filenames", "--output", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)  # attached
    raw: list[str] = []
    try:
        yield lambda: raw[0] if raw else ""
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        if out.exists():
            raw.append(out.read_text())
        shutil.rmtree(out.parent, ignore_errors=True)
        if not raw:
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")


def own_cpu_s(pid: int) -> float:
    """CPU seconds of one process itself (all its threads; not its children)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_s(connection: redis.Redis) -> float:
    info = connection.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def profile_subject(
    *,
    worker_pid: int,
    drain: Callable[[], Any],
    closed_loop: Callable[[], Any],
    calls: int,
    redis_url: str,
    tree_cpu_s: Callable[[], float],
) -> Breakdown:
    """One subject's breakdown: ``drain()`` and ``closed_loop()`` each run ``calls`` calls."""
    breakdown = Breakdown()
    with redis.Redis.from_url(redis_url) as connection:
        tree_before, own_before = tree_cpu_s(), own_cpu_s(worker_pid)
        with sampling(worker_pid) as samples:
            drain()
        own_ms = (own_cpu_s(worker_pid) - own_before) * 1000 / calls
        breakdown.bun_ms = max(0.0, (tree_cpu_s() - tree_before) * 1000 / calls - own_ms)
        counts = layers_of_samples(samples())
        total = sum(counts.values()) or 1
        breakdown.worker = {layer: own_ms * counts[layer] / total for layer in LAYERS}

        used = resource.getrusage(resource.RUSAGE_SELF)
        redis_before = redis_cpu_s(connection)
        closed_loop()
        after = resource.getrusage(resource.RUSAGE_SELF)
        breakdown.redis_ms = (redis_cpu_s(connection) - redis_before) * 1000 / calls
    producer_ms = (after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime) * 1000 / calls
    profiler = cProfile.Profile()
    profiler.runcall(closed_loop)
    seconds = layers_of_profile(pstats.Stats(profiler))
    total_s = sum(seconds.values()) or 1.0
    breakdown.producer = {layer: producer_ms * seconds[layer] / total_s for layer in LAYERS}
    return breakdown


def report(breakdowns: dict[str, Breakdown], calls: int, command: str) -> list[str]:
    """The breakdown table for ``bench/RESULTS.md``."""
    names = list(breakdowns)
    lines = [
        "## Where a call's time goes (profile)",
        "",
        f"CPU ms per call, {calls} calls per subject, measured by `{command}` after the "
        "rounds above (the profile's own overhead is kept out of the totals: the layers "
        "only split CPU measured without it, except py-spy's non-blocking sampling). "
        "Worker layers: py-spy samples of the worker process during a drain; producer "
        "layers: cProfile of `enqueue` and `result` in a closed loop; Bun (and bwrap): the "
        "CPU of all the worker started minus the worker's own; Redis: the server's CPU.",
        "",
        "| place | layer | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for place, attr in (("producer", "producer"), ("worker", "worker")):
        for layer in LAYERS:
            values = [getattr(breakdowns[name], attr).get(layer, 0.0) for name in names]
            lines.append(f"| {place} | {layer} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines.append(
        "| Bun | wrapper and tool | "
        + " | ".join(f"{breakdowns[name].bun_ms:.2f}" for name in names)
        + " |"
    )
    lines.append(
        "| Redis | server | "
        + " | ".join(f"{breakdowns[name].redis_ms:.2f}" for name in names)
        + " |"
    )
    lines.append(
        "| **total** | | "
        + " | ".join(f"**{breakdowns[name].total_ms:.2f}**" for name in names)
        + " |"
    )
    timed = [name for name in names if breakdowns[name].wall]
    if timed:
        lines += [
            "",
            "Wall time of one call, sequential calls, median ms per stretch (from the "
            "envelope's `enqueued_at`, `started_at`, `finished_at` and the runtime's "
            "`total_time`, whole milliseconds):",
            "",
            "| stretch | " + " | ".join(timed) + " |",
            "|---|" + "---|" * len(timed),
        ]
        for stretch in WALL:
            values = [breakdowns[name].wall[stretch] for name in timed]
            lines.append(f"| {stretch} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines
