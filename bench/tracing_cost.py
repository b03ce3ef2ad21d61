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
from dataclasses import dataclass
from pathlib import Path

from toolq import ToolClient, tracing
from toolq.cli.devredis import scratch_database
from toolq.cli.meters import CpuMeter
from toolq.config.loader import load_settings
from toolq.workers.process import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "cli" / "projects" / "bench"
CONFIG = PROJECT / "compozy.yaml"
TOOL = "echo_size"
MODES = ("none", "build", "on")
LABELS = {"none": "not configured", "build": "no tracing (baseline)", "on": "on, ratio 1.0"}
SECTION = "## Tracing (issue 27)"


@dataclass
class Round:
    rate: float
    """Calls per second."""
    worker_cpu_ms: float
    """CPU per call of the worker and everything it started (Bun included)."""
    producer_cpu_ms: float
    """CPU per call of this process (the callers, the client, its spans)."""


def closed_loop(
    client: ToolClient, queue: str, calls: int, concurrency: int, worker: CpuMeter | None = None
) -> Round:
    def one(n: int) -> None:
        result = client.run(TOOL, {"data": f"call {n}"}, queue=queue, wait=60)
        if not result.ok:
            raise RuntimeError(f"call failed: {result.error}")

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency * 2)))  # warm-up
        worker_s = worker.seconds() if worker is not None else 0.0
        producer_s = time.process_time()
        start = time.perf_counter()
        list(pool.map(one, range(calls)))
        elapsed = time.perf_counter() - start
        producer_s = time.process_time() - producer_s
        worker_s = (worker.seconds() if worker is not None else 0.0) - worker_s
    return Round(calls / elapsed, 1000 * worker_s / calls, 1000 * producer_s / calls)


def source_tree(commit: str, into: Path) -> Path:
    """The source of ``commit`` laid out as the installed package (``toolq.workers`` and
    the rest, as ``make typecheck`` lays it out); returns the directory for PYTHONPATH.
    Workers run committed code only: what is being edited in the checkout meanwhile
    does not slip into a round."""
    src, tree = into / "src", into / "tree"
    src.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    package = tree / "toolq"
    package.mkdir(parents=True)
    for entry in (src / "toolq").iterdir():
        (package / entry.name).symlink_to(entry)
    for folder in ("config", "workers", "producers", "cli"):
        if (src / folder).is_dir():
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


def hooks_on_us(path: Path, calls: int = 3000) -> float:
    """Microseconds of CPU (this process, the export thread included) a call's spans
    take with tracing on, every span sampled and written to a file as in the runs: the
    producer's enqueue, the worker's attempt, queue wait and run — what a warm call of
    the bench project creates (no cache, flow control or breaker configured)."""
    saved = os.environ.get("OTEL_TRACES_FILE")
    os.environ["OTEL_TRACES_FILE"] = str(path)
    tracing.reset()
    provider = tracing.provider_from_env()  # this process's own, not the global one
    tracing._tracer = provider.get_tracer("toolq")
    try:
        start = time.process_time()
        for n in range(calls):
            call_id, headers = f"{n:08d}-call", {}  # (uuid4 reads os.urandom: slow here)
            with tracing.producer_span(
                "toolq.enqueue", headers, queue="bench", message_id=call_id, tool_id=TOOL
            ):
                pass
            with tracing.consumer_span(
                "toolq.attempt",
                headers,
                queue="bench",
                message_id=call_id,
                tool_id=TOOL,
                attributes={"toolq.attempt": 1},
            ) as span:
                tracing.queue_wait(span, headers)
                with tracing.run_span(TOOL, "warm") as run:
                    tracing.record_output(run, f"line {n}")
                    tracing.record_spawn(run, None)
                tracing.set_outcome(span, "succeeded")
            if n % 200 == 199:  # paced as calls are: the export queue never drops a span
                provider.force_flush()
        provider.shutdown()  # every span written
        return (time.process_time() - start) / calls * 1e6
    finally:
        os.environ["OTEL_TRACES_FILE"] = saved or ""
        tracing.reset()


def report(
    rounds: dict[str, list[Round]], hooks_us: float, on_us: float, args: argparse.Namespace
) -> str:
    def median(mode: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in rounds[mode])

    def cpu(mode: str) -> float:
        return median(mode, "worker_cpu_ms") + median(mode, "producer_cpu_ms")

    lines = [
        SECTION,
        "",
        f"Warm closed loop, `{TOOL}`, {args.concurrency} callers, {args.calls} calls a round, "
        f"{args.rounds} rounds (modes rotated; medians). Workers run committed code "
        f"(`git archive`): {args.commit} with tracing not configured and on (every span "
        f"of producer and worker sampled, ratio 1.0, batched to a file), and {args.baseline}, "
        "before tracing existed. CPU per call: the worker's process tree (Bun included) "
        "and the producer's process, against the wall clock's calls/s, which other load on "
        f"the machine moves far more. `python bench/tracing_cost.py --rounds {args.rounds}`",
        "",
        "| tracing | calls/s | rounds | CPU ms/call (worker + producer) | against no tracing |",
        "|---|---:|---|---:|---:|",
    ]
    for mode in MODES:
        each = ", ".join(f"{r.rate:.0f}" for r in rounds[mode])
        change = (
            "—"
            if mode == "build"
            else f"{100 * (median(mode, 'rate') / median('build', 'rate') - 1):+.1f} % calls/s, "
            f"{100 * (cpu(mode) / cpu('build') - 1):+.1f} % CPU"
        )
        lines.append(
            f"| {LABELS[mode]} | {median(mode, 'rate'):.1f} | {each} | {cpu(mode):.2f} "
            f"({median(mode, 'worker_cpu_ms'):.2f} + {median(mode, 'producer_cpu_ms'):.2f}) "
            f"| {change} |"
        )
    lines += [
        "",
        f"Not configured, the hooks themselves (timed in a loop): {hooks_us:.2f} µs per call, "
        f"{100 * hooks_us / (cpu('none') * 1000):.3f} % of a call's CPU. On, against not "
        f"configured: {100 * (1 - median('on', 'rate') / median('none', 'rate')):.1f} % fewer "
        f"calls/s, {100 * (cpu('on') / cpu('none') - 1):+.1f} % CPU per call; its spans "
        f"themselves (timed in a loop, built and written): {on_us:.0f} µs per call, "
        f"{100 * on_us / (cpu('none') * 1000):.1f} % of a call's CPU. Load average at the "
        f"end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
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
    parser.add_argument("--commit", default="HEAD", help="the workers' code, with tracing")
    parser.add_argument("--report", type=Path, help="put the section in this report too")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    args = parser.parse_args()
    logging.getLogger("toolq.producer").setLevel(logging.ERROR)  # its queues are ad hoc
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            del os.environ[name]
    hooks_us = hooks_off_us()
    print(f"hooks, not configured: {hooks_us:.2f} µs per call", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        on_us = hooks_on_us(Path(tmp) / "spans.jsonl")
    print(f"spans, on: {on_us:.0f} µs per call", flush=True)
    rounds: dict[str, list[Round]] = {mode: [] for mode in MODES}
    with (
        tempfile.TemporaryDirectory() as tmp,
        scratch_database(args.redis_url, "bench") as url,
    ):
        trees = {
            "current": source_tree(args.commit, Path(tmp) / "current"),
            "baseline": source_tree(args.baseline, Path(tmp) / "baseline"),
        }
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
                    env["PYTHONPATH"] = str(trees["baseline" if mode == "build" else "current"])
                    for name in traced:  # the producer traces in "on" only
                        os.environ[name] = traced[name] if mode == "on" else ""
                    tracing.reset()
                    queue = f"bench-trace-{uuid.uuid4().hex[:8]}"
                    with WorkerProcess(
                        config=CONFIG, redis_url=url, queues=[queue], env=env
                    ) as worker:
                        worker.start(client.app)
                        cpu = CpuMeter(worker.pid)
                        try:
                            measured = closed_loop(client, queue, args.calls, args.concurrency, cpu)
                        finally:
                            worker.stop()  # so the cgroup can be emptied and removed
                            cpu.close()
                    rounds[mode].append(measured)
                    print(
                        f"{LABELS[mode]:>22}: {measured.rate:7.1f} calls/s, CPU per call "
                        f"{measured.worker_cpu_ms:.2f} ms worker, "
                        f"{measured.producer_cpu_ms:.2f} ms producer",
                        flush=True,
                    )
        spans = Path(spans_file).read_text().count("\n") if os.path.exists(spans_file) else 0
    section = report(rounds, hooks_us, on_us, args)
    print(f"\n{section}\n({spans} spans written)")
    if args.report is not None:
        write_section(args.report, section)


if __name__ == "__main__":
    main()
