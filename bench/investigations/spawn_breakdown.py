"""Where a fresh sandboxed spawn-mode process's CPU goes, layer by layer.

The launcher's own command line (captured from one launch) is run with one layer more
each time, interleaved, one process at a time, a trivial call each; CPU of everything
this script starts, from a cpuacct cgroup around it (getrusage where there is none):

1. Bun on the wrapper, no options (``toolq bench``'s "bare wrapper start");
2. + the wrapper's guards (no FFI, no exec), as the launcher passes them;
3. + bwrap (the launcher's sandbox, as root);
4. + the joining shell and setpriv, without a cgroup to join;
5. the launch as the worker makes it: a cgroup created, joined and removed too.

    .venv/bin/python bench/investigations/spawn_breakdown.py [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spawn_cost import LIMITS, PROJECT, cpu_clock  # beside this script

from toolq.cli.bench import NOOP_REQUEST
from toolq.workers.runtime import launch
from toolq.workers.runtime.bun import WRAPPER, find_bun
from toolq.workers.runtime.limits import Cgroups, joining
from toolq.workers.runtime.sandbox import Permissions, Sandbox, make_sandbox


def captured_launch(
    bun: Path, sandbox: Sandbox, cgroups: Cgroups
) -> tuple[list[str], dict[str, Any]]:
    """The argv and Popen options of one sandboxed, cgroup-joined launch (not started)."""
    seen: dict[str, Any] = {}

    class Captured(OSError):
        """An OSError: the launcher then removes the cgroup it made and closes its pipe."""

    def popen(argv: list[str], **options: Any) -> None:
        seen.update(argv=argv, options=options)
        raise Captured

    real, launch.subprocess.Popen = launch.subprocess.Popen, popen  # type: ignore[assignment]
    try:
        launcher = launch.Launcher(
            bun, PROJECT / "entrypoint.ts", PROJECT, sandbox=sandbox, cgroups=cgroups
        )
        launcher.launch(
            permissions=Permissions(), limits=LIMITS,
            env=launch.base_environment(), warm=False,
        )  # fmt: skip
    except OSError:
        if not seen:
            raise
    finally:
        launch.subprocess.Popen = real  # type: ignore[misc]
    return seen["argv"], seen["options"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    bun = find_bun(None, PROJECT)
    cgroups = Cgroups.detect()
    sandbox = make_sandbox("required", bun, WRAPPER, PROJECT)
    if cgroups is None or sandbox is None:
        raise SystemExit("needs a sandbox and cgroups here")
    argv, options = captured_launch(bun, sandbox, cgroups)
    bwrap_at = next(i for i, arg in enumerate(argv) if arg.endswith("bwrap"))
    bun_argv = argv[argv.index("--", bwrap_at) + 1 :]
    script = argv[2]  # the joining shell's: joins, then `ulimit -n`, then exec setpriv
    no_join = ["/bin/sh", "-c", script[script.index("ulimit") :], "toolq-join"]

    def run(line: list[str]) -> None:
        """Run ``line`` (ending in Bun's argv) with a fresh envelope pipe and, if it has
        bwrap's ``--seccomp``, a fresh filter fd; check the call succeeded."""
        line = list(line)
        read_fd, write_fd = os.pipe()
        fds = [write_fd]
        bun_at = len(line) - 1 - line[::-1].index(bun_argv[0])  # Bun itself (the last one)
        line[bun_at + 6] = str(write_fd)  # bun <3 flags> wrapper.ts <entrypoint> <fd>
        sandboxed = "--seccomp" in line
        if sandboxed:
            fds.append(sandbox.seccomp_fd())
            line[line.index("--seccomp") + 1] = str(fds[-1])
        env = dict(options["env"]) if sandboxed else {**options["env"], "TMPDIR": "/tmp"}
        proc = subprocess.Popen(
            line, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=fds, cwd=PROJECT, env=env, start_new_session=True,
        )  # fmt: skip
        for fd in fds:
            os.close(fd)
        _, stderr = proc.communicate(NOOP_REQUEST)
        with os.fdopen(read_fd, "rb") as envelope:
            if b'"error":null' not in envelope.read():
                raise RuntimeError(f"the call failed: {stderr.decode(errors='replace')[-500:]}")

    def with_cgroup() -> None:
        group = cgroups.create(LIMITS)
        try:
            run(joining(group, LIMITS, argv[bwrap_at:], sandbox.run_as))
        finally:
            group.remove()

    layers: dict[str, Callable[[], None]] = {
        "Bun on the wrapper (bare)": lambda: run(bun_argv[:8]),  # ... <entrypoint> <fd> spawn
        "+ the wrapper's guards": lambda: run(bun_argv),
        "+ bwrap (as root)": lambda: run(argv[bwrap_at:]),
        "+ shell and setpriv": lambda: run(no_join + argv[argv.index("toolq-join") + 1 :]),
        "+ a cgroup: the worker's launch": with_cgroup,
    }
    used: dict[str, list[float]] = {name: [] for name in layers}
    with cpu_clock() as clock:
        for _ in range(args.runs):
            for name, layer in layers.items():
                before = clock()
                layer()
                used[name].append((clock() - before) * 1000)
    print(f"{'CPU per process, median of ' + str(args.runs):40} {'ms':>7} {'added':>7}")
    last = 0.0
    for name, values in used.items():
        ms = statistics.median(values)
        print(f"{name:40} {ms:7.2f} {ms - last:+7.2f}")
        last = ms


if __name__ == "__main__":
    main()
