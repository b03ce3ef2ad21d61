"""`toolq bench`'s figures and its report: what a run measures (subjects, sizes, slots,
budgets), the measurements of each runtime mode, issue 26's targets, the Markdown report
(``bench/RESULTS.md``) and its chart.

Over 400 lines on purpose: the figures' fields and the report's sentences about them
change together, and read best side by side.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import celery

from toolq.cli.loadtest import percentile
from toolq.cli.profile_call import Breakdown
from toolq.cli.profile_call import report as profile_report
from toolq.workers.runtime.bun import find_bun

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


def _med_or_dash(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def per_round(ones: list[float], plains: list[float], *, diff: bool = False) -> list[float]:
    """Each round's ratio (or difference) of two subjects measured in that round."""
    return [one - plain if diff else one / plain for one, plain in zip(ones, plains, strict=False)]


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """Min-max over the rounds."""
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}" if values else "-"


def targets(results: dict[str, Figures], floor_cpu_ms: float) -> list[Target]:
    """Issue 26's targets (and issue 15's map() and memory ones), as far as the measured
    modes allow. Warm against plain Celery: the median of the per-round ratios (both
    measured in the same round), with their spread; ``floor_cpu_ms``: the irreducible
    sandboxed start (:mod:`toolq.cli.spawn_floor`)."""
    med = statistics.median
    found = []
    warm = results.get("warm")
    if warm is not None:
        plain = warm.subjects["celery"]
        for name, label in (("tool", "breaker off"), ("guarded", "breaker on")):
            one = warm.subjects[name]
            if not one.closed:
                continue
            ratios = per_round(one.closed, plain.closed)
            found.append(
                Target(
                    f"warm tool ({label}), closed-loop throughput",
                    f"{med(ratios):.2f}x plain (rounds {spread(ratios)})",
                    ">= 0.80x",
                    med(ratios) >= 0.8,
                )
            )
            deltas = per_round(one.p50_ms, plain.p50_ms, diff=True)
            found.append(
                Target(
                    f"warm tool ({label}), p50 latency",
                    f"{med(deltas):+.2f} ms vs plain (rounds {spread(deltas, '{:+.2f}')})",
                    "<= +0.60 ms",
                    med(deltas) <= 0.6,
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
                    "<= 1.5x",
                    ratio <= 1.5,
                )
            )
    if spawn is not None and floor_cpu_ms > 0:
        ratio = med(spawn.tool.cpu_ms) / floor_cpu_ms
        found.append(
            Target(
                "spawn tool, worker CPU per call (Celery, toolq and the process)",
                f"{ratio:.2f}x the irreducible sandboxed start",
                "<= 1.25x",
                ratio <= 1.25,
            )
        )
    if spawn is not None and warm is not None and floor_cpu_ms > 0:
        # The line above counts Celery's and toolq's own per-call work too (warm's whole
        # CPU per call); this one, what a fresh process costs toolq.
        ratio = (med(spawn.tool.cpu_ms) - med(warm.tool.cpu_ms)) / floor_cpu_ms
        found.append(
            Target(
                "spawn tool, CPU a fresh process costs (spawn minus warm, per call)",
                f"{ratio:.2f}x the irreducible sandboxed start",
                "<= 1.25x",
                ratio <= 1.25,
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


def render(
    results: dict[str, Figures],
    floor_cpu_ms: list[float],
    rounds: int,
    calls: int,
    sequential: int,
    per_size: int,
    redis_version: str,
    sandbox: str,
    plot_name: str,
    load: tuple[float, float, float],
    *,
    layers: dict[str, list[float]] | None = None,
    busy: bool = False,
) -> str:
    """The report; ``floor_cpu_ms``: the irreducible sandboxed start's CPU per process
    (per run), ``layers``: spawn's layers over it (:func:`toolq.cli.spawn_floor.measure`),
    ``busy``: a process kept one core busy during the run (CI-like load)."""
    med = statistics.median
    floor = med(floor_cpu_ms) if floor_cpu_ms else 0.0
    lines = [
        "# toolq benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with "
        f"`{_command(results, rounds, calls, sandbox, busy)}` (`make bench`); every figure is "
        f"the median of {rounds} interleaved rounds (the order rotates each round), so one "
        "noisy round cannot decide; a spread is the min-max over the rounds, and a ratio to "
        "plain Celery is taken within each round (both measured in it), then its median. "
        "Baselines are measured in the same run: a **plain Celery app's** no-op task "
        "(`cli/bench_baseline.py`: no toolq settings, late acks, prefetch 1, its own worker "
        "process), `toolq.noop` on toolq's own worker, and spawn's **irreducible sandboxed "
        "start**: bubblewrap with a spawned tool's namespaces, mounts and seccomp filter "
        "running bare Bun on the no-op (`cli/projects/bench/floor.ts`: load the entrypoint, "
        "read the request, run the tool, write the result; no wrapper, guards or cgroup).",
        "",
        f"- machine: {_cpu()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB; load average "
        f"when the run ended {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)",
        f"- Python {platform.python_version()}, Celery {celery.__version__}, "
        f"Bun {_bun_version()}, Redis {redis_version}",
        f"- workers: threads pool, {CONCURRENCY} slots, prefetch 1 per slot, late acks, "
        f"`runtime.sandbox: {sandbox}`; producer, workers and Redis share the machine"
        + ("; **another process kept one core busy** (CI-like load)" if busy else ""),
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
        "call. Ratios are against the plain Celery no-op, per round (median, and min-max "
        "in brackets).",
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
            drains = per_round(one.drain, plain.drain)
            closed = per_round(one.closed, plain.closed)
            deltas = per_round(one.p50_ms, plain.p50_ms, diff=True)
            lines.append(
                f"| {mode} | {label} | {med(one.drain):.0f} | "
                f"{med(drains):.2f}x ({spread(drains)}) | {med(one.closed):.0f} | "
                f"{med(closed):.2f}x ({spread(closed)}) | {med(one.p50_ms):.2f} | "
                f"{med(one.p95_ms):.2f} | {med(deltas):+.2f} ms ({spread(deltas, '{:+.2f}')}) | "
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
        "## Targets (issue 26)",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for target in targets(results, floor):
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
        "drains trivial tool calls (Celery, toolq, Bun), against the irreducible sandboxed "
        f"start ({floor:.2f} ms per process, spread {spread(floor_cpu_ms)}).",
        "",
        "| mode | peak PSS MiB | of budget | summed RSS MiB | CPU per call ms | "
        "vs irreducible start |",
        "|---|---|---|---|---|---|",
    ]
    for mode, f in results.items():
        lines.append(
            f"| {mode} | {med(f.peak_pss_mib):.0f} | "
            f"{med(f.peak_pss_mib) / MEMORY_BUDGET_MIB:.0%} | {med(f.peak_rss_mib):.0f} | "
            f"{med(f.tool.cpu_ms):.2f} | "
            + (f"{med(f.tool.cpu_ms) / floor:.2f}x |" if floor else "- |")
        )
    spawn = results.get("spawn")
    if layers:
        lines += [
            "",
            "## Spawn: where a process's CPU goes",
            "",
            "CPU per process (cpuacct), each layer added to the one above, interleaved, one "
            "process at a time, a no-op call each (`toolq.cli.spawn_floor`). Layers from the "
            "launcher's own command line; the last row is the rest of the spawn worker's CPU "
            "per call (Celery, the handler, the Python side of a launch and its disposal).",
            "",
            *spawn_floor_table(layers),
        ]
        if spawn is not None:
            launch_ms = med(list(layers.values())[-1])
            rest = med(spawn.tool.cpu_ms) - launch_ms
            lines.append(
                f"| + the worker (spawn worker CPU per call {med(spawn.tool.cpu_ms):.2f} ms) | "
                f"{med(spawn.tool.cpu_ms):.2f} | {spread(spawn.tool.cpu_ms)} | {rest:+.2f} |"
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


def _command(
    results: dict[str, Figures], rounds: int, calls: int, sandbox: str, busy: bool = False
) -> str:
    """The command line that produced a report."""
    line = f"toolq bench --modes {','.join(results)} --rounds {rounds} --calls {calls}"
    line += "" if sandbox == "auto" else f" --sandbox {sandbox}"
    return line + (" --busy-core" if busy else "")


def spawn_floor_table(used: dict[str, list[float]]) -> list[str]:
    """Median CPU per layer, its spread, and what it adds to the layer above."""
    lines = ["| layer | CPU ms per process | spread (min-max) | added |", "|---|---|---|---|"]
    last = 0.0
    for name, values in used.items():
        ms = statistics.median(values)
        lines.append(f"| {name} | {ms:.2f} | {spread(values)} | {ms - last:+.2f} |")
        last = ms
    return lines


def _pooled(rounds: list[list[float]]) -> list[float]:
    return sorted(value for values in rounds for value in values)


def plot(results: dict[str, Figures], path: Path) -> None:
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
