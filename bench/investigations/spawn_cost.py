"""What a spawn-mode process costs, and what starting it ahead of demand saves.

1. Joining a cgroup (the kernel's migration) in a ``preexec_fn`` against a shell that
   joins and execs (what :func:`toolq.workers.runtime.limits.joining` does), from a
   Python process the size of a worker: a ``preexec_fn`` makes subprocess fork the
   whole process instead of using vfork.
2. A trivial call through the runner, sandboxed and in cgroups: spawn with a cold start
   per call, spawn with processes started ahead (``runtime.spawn_ahead``), warm.

Interleaved, medians; CPU (of the joins) from a cpuacct cgroup around this process
where possible, else getrusage.

    .venv/bin/python bench/investigations/spawn_cost.py [--calls 100]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from toolq.config.settings import TimeLimits
from toolq.workers.runtime.base import Call
from toolq.workers.runtime.bun import WRAPPER, find_bun
from toolq.workers.runtime.launch import Launcher
from toolq.workers.runtime.limits import Cgroup, Cgroups, ResourceLimits, joining
from toolq.workers.runtime.sandbox import make_sandbox
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime

PROJECT = Path(__file__).resolve().parents[2] / "cli" / "projects" / "bench"
LIMITS = ResourceLimits(512, 256, 1024, None)
CPUACCT = Path("/sys/fs/cgroup/cpuacct")


@contextlib.contextmanager
def cpu_clock() -> Iterator[Callable[[], float]]:
    """CPU seconds of this process and all it starts."""
    group = CPUACCT / f"toolq-spawn-cost-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError:

        def rusage() -> float:
            own = resource.getrusage(resource.RUSAGE_SELF)
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

        yield rusage
        return
    try:
        yield lambda: int((group / "cpuacct.usage").read_text()) / 1e9
    finally:
        (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))
        time.sleep(0.5)  # the last children gone
        with contextlib.suppress(OSError):
            group.rmdir()


def preexec_join(cgroup: Cgroup) -> Callable[[], None]:
    """What the launcher did before: join in the child, in Python, after a fork."""
    procs = cgroup.procs_files()

    def join() -> None:
        for path in procs:
            with open(path, "w") as handle:
                handle.write("0")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    return join


def measure(
    runners: dict[str, Callable[[], object]],
    rounds: int,
    clock: Callable[[], float],
    *,
    with_cpu: bool = True,
    pause_s: float = 0.02,
) -> None:
    """Interleaved rounds; CPU only where the work is synchronous (a process started
    ahead is replaced in the background: its CPU is the bench's ``worker CPU``)."""
    walls: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, float] = dict.fromkeys(runners, 0.0)
    for _ in range(rounds):
        for name, run in runners.items():
            used, started = clock(), time.perf_counter()
            run()
            walls[name].append((time.perf_counter() - started) * 1000)
            cpu[name] += clock() - used
            time.sleep(pause_s)  # background work (a replacement starting) done first
    print(f"{'':34} {'wall p50 ms':>12} {'CPU ms' if with_cpu else '':>8}")
    for name in runners:
        used = f"{cpu[name] * 1000 / rounds:8.2f}" if with_cpu else ""
        print(f"{name:34} {statistics.median(walls[name]):12.2f} {used}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    cgroups = Cgroups.detect()
    if cgroups is None:
        raise SystemExit("no cgroup can be made here")
    ballast = bytearray(150 * 2**20)  # a worker-sized process: what a fork copies
    ballast[::4096] = b"\1" * len(ballast[::4096])

    def join_with(how: str) -> None:
        group = cgroups.create(LIMITS)
        try:
            if how == "preexec":
                subprocess.run(["/bin/true"], preexec_fn=preexec_join(group), check=True)
            else:
                subprocess.run(joining(group, LIMITS, ["/bin/true"]), check=True)
        finally:
            group.remove()

    bun = find_bun(None, PROJECT)
    launcher = Launcher(
        bun,
        PROJECT / "entrypoint.ts",
        PROJECT,
        sandbox=make_sandbox("required", bun, WRAPPER, PROJECT),
        cgroups=cgroups,
    )
    call = Call("noop", "bench", {}, {}, TimeLimits(10, 12))
    cold, ahead = SpawnRuntime(launcher), SpawnRuntime(launcher, ahead=2)
    ahead.start([(call.permissions, call.resources)])
    warm = WarmRuntime(launcher, 1, max_calls_per_process=10**6, max_rss_mb=1024)
    warm.start()
    time.sleep(2)
    try:
        with cpu_clock() as clock:
            print("joining a cgroup, from a 150 MB Python process")
            measure(
                {
                    "preexec_fn (fork)": lambda: join_with("preexec"),
                    "shell, then exec (vfork)": lambda: join_with("shell"),
                },
                args.calls,
                clock,
            )
            print("\na trivial call through the runner, sandboxed, in cgroups")
            measure(
                {
                    "spawn, cold start": lambda: cold.run(call),
                    "spawn, started ahead": lambda: ahead.run(call),
                    "warm": lambda: warm.run(call),
                },
                args.calls,
                clock,
                with_cpu=False,
                pause_s=0.15,
            )
            for runtime in (cold, ahead, warm):
                runtime.close()  # inside the clock's cgroup: it is removed empty
    finally:
        for runtime in (cold, ahead, warm):
            runtime.close()
    del ballast


if __name__ == "__main__":
    main()
