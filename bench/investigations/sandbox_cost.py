"""What the sandbox costs per call, in each runtime mode (docs/security/sandbox.md).

Runs a trivial tool through the runner directly (no queue), interleaving four set-ups —
spawn and warm, each with and without bubblewrap + cgroups — and prints the median wall
time per call and the ratio sandboxed / unsandboxed.

    .venv/bin/python bench/investigations/sandbox_cost.py [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from toolq.config.settings import TimeLimits
from toolq.workers.runtime.base import Call
from toolq.workers.runtime.bun import WRAPPER, find_bun
from toolq.workers.runtime.launch import Launcher
from toolq.workers.runtime.limits import Cgroups
from toolq.workers.runtime.sandbox import Permissions, make_sandbox
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime

PROJECT = Path(__file__).resolve().parents[2] / "cli" / "projects" / "bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    bun = find_bun(None, PROJECT)
    runners: dict[str, SpawnRuntime | WarmRuntime] = {}
    for sandboxed in (False, True):
        launcher = Launcher(
            bun,
            PROJECT / "entrypoint.ts",
            PROJECT,
            sandbox=make_sandbox("required" if sandboxed else "off", bun, WRAPPER, PROJECT),
            cgroups=Cgroups.detect() if sandboxed else None,
        )
        label = "sandboxed" if sandboxed else "plain"
        runners[f"spawn {label}"] = SpawnRuntime(launcher)
        pool = WarmRuntime(
            launcher, 1, max_calls_per_process=10**6, max_rss_mb=1024, permissions=Permissions()
        )
        pool.start()
        runners[f"warm {label}"] = pool
    call = Call("noop", "bench", {}, {}, TimeLimits(10, 12))
    times: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():
        for _ in range(5):
            runner.run(call)
    for _ in range(args.calls):
        for name, runner in runners.items():
            started = time.perf_counter()
            outcome = runner.run(call)
            times[name].append((time.perf_counter() - started) * 1000)
            assert outcome.error is None, outcome.error
    for runner in runners.values():
        if isinstance(runner, WarmRuntime):
            runner.close()
    print(f"{'set-up':18} {'median ms':>10}")
    for name, values in times.items():
        print(f"{name:18} {statistics.median(values):10.2f}")
    for mode in ("spawn", "warm"):
        ratio = statistics.median(times[f"{mode} sandboxed"]) / statistics.median(
            times[f"{mode} plain"]
        )
        print(f"{mode}: sandboxed / plain = {ratio:.2f}x")


if __name__ == "__main__":
    main()
