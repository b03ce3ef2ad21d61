"""What OpenTelemetry tracing costs (issue 27): warm closed-loop throughput with tracing
on (every span sampled, ratio 1.0), not configured, and without tracing at all (a worker
built from the commit before tracing existed), in one run on the same machine.

- **on**: the producer (this process) and the worker both export every span, batched, as
  JSON lines to a file (``OTEL_TRACES_FILE``; ``parentbased_traceidratio`` at 1.0).
- **not configured**: no ``OTEL_*`` variable; toolq imports nothing of OpenTelemetry and
  every hook is a cached flag check.
- **no tracing**: the worker runs the source of ``--baseline`` (default d47dcb3, the
  commit before d47a42c added tracing; ``git archive`` into a temporary directory, laid
  out as the installed package and put first on the worker's ``PYTHONPATH``). The
  producer is this checkout's, not configured, in both of those.

Each round starts a fresh worker per mode (warm, the bench project's ``echo_size``),
warms it up, then ``--concurrency`` threads run ``--calls`` calls back to back; the modes
rotate ``--rounds`` times; the medians are compared. End to end, a few per cent is noise
on a shared machine, so the hooks' own cost when tracing is not configured is also timed
directly: what one call goes through (the task's check, the step spans of the handler,
the chunk's context) in a loop, against the CPU one call takes.

    .venv/bin/python bench/tracing_cost.py [--calls 600] [--concurrency 8] [--rounds 3]
        [--baseline d47dcb3] [--report bench/RESULTS.md] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import tempfile
import time
import timeit
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from toolq import ToolClient, tracing
from toolq.cli.devredis import scratch_database
from toolq.config.loader import load_settings
from toolq.workers.process import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "cli" / "projects" / "bench"
CONFIG = PROJECT / "compozy.yaml"
TOOL = "echo_size"
MODES = ("none", "build", "on")
LABELS = {"none": "not configured", "build": "no tracing (baseline)", "on": "on, ratio 1.0"}
SECTION = "## Tracing (issue 27)"


def closed_loop(client: ToolClient, queue: str, calls: int, concurrency: int) -> float:
    def one(n: int) -> None:
        result = client.run(TOOL, {"data": f"call {n}"}, queue=queue, wait=60)
        if not result.ok:
            raise RuntimeError(f"call failed: {result.error}")

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency * 2)))  # warm-up
        start = time.perf_counter()
        list(pool.map(one, range(calls)))
        return calls / (time.perf_counter() - start)


def baseline_tree(commit: str, into: Path) -> Path:
    """The source of ``commit`` laid out as the installed package (``toolq.workers`` and
    the rest, as ``make typecheck`` lays it out); returns the directory for PYTHONPATH."""
    src, tree = into / "src", into / "tree"
    src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    package = tree / "toolq"
    package.mkdir(parents=True)
    for entry in (src / "toolq").iterdir():
        (package / entry.name).symlink_to(entry)
    for folder in ("config", "workers", "producers"):
        (package / folder).symlink_to(src / folder)
    netshim = ROOT / "workers" / "runtime" / "netshim.so"  # built by make setup, not tracked
    if netshim.exists():
        (src / "workers" / "runtime" / "netshim.so").write_bytes(netshim.read_bytes())
    return tree


def hooks_off_us(loops: int = 200_000) -> float:
    """Microseconds a call spends in tracing's hooks when tracing is not configured: the
    task's check, five step spans (cache, flow, breaker, run, the chunk's context)."""
    tracing.reset()
    assert not tracing.enabled()

    def one_call() -> None:
        tracing.enabled()
        tracing.current_context()
        for name in ("toolq.cache", "toolq.flow", "toolq.breaker", "toolq.run"):
            with tracing.step(name):
                pass
        tracing.record_output(None, "")

    return min(timeit.repeat(one_call, number=loops, repeat=5)) / loops * 1e6


def report(rates: dict[str, list[float]], hooks_us: float, args: argparse.Namespace) -> str:
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    base = medians["build"]
    lines = [
        SECTION,
        "",
        f"Warm closed loop, `{TOOL}`, {args.concurrency} callers, {args.calls} calls a round, "
        f"{args.rounds} rounds (modes rotated; medians); the baseline is a worker built "
        f"from {args.baseline}, before tracing existed. "
        f"`python bench/tracing_cost.py --rounds {args.rounds}`",
        "",
        "| tracing | calls/s (median) | rounds | against no tracing |",
        "|---|---:|---|---:|",
    ]
    for mode in MODES:
        rounds = ", ".join(f"{r:.0f}" for r in rates[mode])
        change = 100 * (medians[mode] / base - 1)
        lines.append(
            f"| {LABELS[mode]} | {medians[mode]:.1f} | {rounds} | "
            + ("—" if mode == "build" else f"{change:+.1f} %")
            + " |"
        )
    cpu_per_call_us = (os.cpu_count() or 1) * 1e6 / medians["none"]  # every core busy
    lines += [
        "",
        f"Not configured, the hooks themselves: {hooks_us:.2f} µs per call (timed in a loop), "
        f"{100 * hooks_us / cpu_per_call_us:.3f} % of the ~{cpu_per_call_us / 1000:.1f} ms of "
        "CPU a warm call takes here (both cores busy). On: "
        f"{100 * (1 - medians['on'] / medians['none']):.1f} % fewer calls/s than not configured.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Put ``section`` in the report at ``path``, replacing an earlier one."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="d47dcb3", help="the commit before tracing")
    parser.add_argument("--report", type=Path, help="put the section in this report too")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    args = parser.parse_args()
    logging.getLogger("toolq.producer").setLevel(logging.ERROR)  # its queues are ad hoc
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            del os.environ[name]
    hooks_us = hooks_off_us()
    print(f"hooks, not configured: {hooks_us:.2f} µs per call", flush=True)
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    with (
        tempfile.TemporaryDirectory() as tmp,
        scratch_database(args.redis_url, "bench") as url,
    ):
        baseline = baseline_tree(args.baseline, Path(tmp))
        spans_file = str(Path(tmp) / "spans.jsonl")
        traced = {
            "OTEL_TRACES_FILE": spans_file,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "1.0",
        }
        settings = load_settings(CONFIG, environ={}, overrides={"redis_url": url})
        with ToolClient(settings) as client:
            for round_no in range(args.rounds):
                for mode in MODES[round_no % 3 :] + MODES[: round_no % 3]:
                    env = dict(traced) if mode == "on" else {"OTEL_TRACES_FILE": ""}
                    if mode == "build":
                        env["PYTHONPATH"] = str(baseline)
                    for name in traced:  # the producer traces in "on" only
                        os.environ[name] = traced[name] if mode == "on" else ""
                    tracing.reset()
                    queue = f"bench-trace-{uuid.uuid4().hex[:8]}"
                    with WorkerProcess(
                        config=CONFIG, redis_url=url, queues=[queue], env=env
                    ) as worker:
                        worker.start(client.app)
                        rate = closed_loop(client, queue, args.calls, args.concurrency)
                    rates[mode].append(rate)
                    print(f"{LABELS[mode]:>22}: {rate:7.1f} calls/s", flush=True)
        spans = Path(spans_file).read_text().count("\n") if os.path.exists(spans_file) else 0
    section = report(rates, hooks_us, args)
    print(f"\n{section}\n({spans} spans written)")
    if args.report is not None:
        write_section(args.report, section)


if __name__ == "__main__":
    main()
