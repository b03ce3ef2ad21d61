"""Where a fresh sandboxed spawn-mode process's CPU goes, layer by layer, over its
irreducible sandboxed start (bwrap with a spawned tool's namespaces, mounts and seccomp
filter, running bare Bun on the no-op): :mod:`toolq.cli.spawn_floor`, which `toolq bench`
reports too (bench/RESULTS.md, "Spawn: where a process's CPU goes").

    .venv/bin/python bench/investigations/spawn_breakdown.py [--runs 30]
"""

from __future__ import annotations

import argparse

from toolq.cli import spawn_floor
from toolq.cli.bench_report import spawn_floor_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    used = spawn_floor.measure(runs=args.runs)
    if used is None:
        raise SystemExit("needs a sandbox and cgroups here")
    print("\n".join(spawn_floor_table(used)))


if __name__ == "__main__":
    main()
