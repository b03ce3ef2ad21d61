"""What the warm call boundary costs per call (docs/runtime-modes.md).

Two sandboxed warm processes run a trivial tool, interleaved: one clears what each
call left (processes, /tmp, /dev/shm — workers/runtime/isolation.py), the other skips
that step (the wrapper's timer clean-up runs in both). Prints the median wall time per
call of each, its reset included (which the worker runs after the reply is stored, off
the caller's path: WarmRuntime.settle), and their ratio.

    .venv/bin/python bench/investigations/isolation_cost.py [--calls 500]
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
from toolq.workers.runtime.warm import WarmRuntime

PROJECT = Path(__file__).resolve().parents[2] / "cli" / "projects" / "bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    bun = find_bun(None, PROJECT)
    launcher = Launcher(
        bun,
        PROJECT / "entrypoint.ts",
        PROJECT,
        sandbox=make_sandbox("required", bun, WRAPPER, PROJECT),
        cgroups=Cgroups.detect(),
    )
    pools = {}
    for name in ("boundary", "no boundary"):
        pool = WarmRuntime(
            launcher, 1, max_calls_per_process=10**6, max_rss_mb=1024, permissions=Permissions()
        )
        pool.start()
        pools[name] = pool
    call = Call("noop", "bench", {}, {"API_KEY": "k" * 32}, TimeLimits(10, 12))
    for pool in pools.values():
        pool.run(call)
    for pool in pools.values():
        pool.settle()
    for process in pools["no boundary"]._idle:
        process.boundary.clear = lambda: True  # type: ignore[method-assign]
    times: dict[str, list[float]] = {name: [] for name in pools}
    for _ in range(args.calls):
        for name, pool in pools.items():
            started = time.perf_counter()
            outcome = pool.run(call)
            pool.settle()  # the reset, as the worker runs it once the reply is stored
            times[name].append((time.perf_counter() - started) * 1000)
            assert outcome.error is None, outcome.error
    for pool in pools.values():
        pool.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:12} {median:6.3f} ms")
    print(f"ratio {medians['boundary'] / medians['no boundary']:.2f}x")


if __name__ == "__main__":
    main()
