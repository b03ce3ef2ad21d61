"""Spawn mode's CPU per process against its irreducible cost, layer by layer.

The **irreducible sandboxed start** is what any sandboxed call must do: bubblewrap with
the same namespaces, mounts and seccomp filter as a spawned tool's, running bare Bun on
``projects/bench/floor.ts`` (load the entrypoint, read the request, run the no-op tool,
write its result). Then toolq's layers, each added to the one before, from the launcher's
own command line (captured from one launch, never started):

1. toolq's wrapper in place of the bare runner (no options);
2. + the wrapper's guards (no FFI, no exec), as the launcher passes them;
3. + the step that drops to the tools' uid before bwrap (cgjoin, or a shell and setpriv),
   without a cgroup;
4. + a cgroup created, joined and removed: the launch as the worker makes it.

What the worker adds on top (Celery, the handler, the Python side of a launch and its
disposal) is the spawn worker's CPU per call minus layer 4.

Interleaved, one process at a time, a trivial call each; CPU of everything started, from
a cpuacct cgroup around this process (getrusage of waited children where there is none).
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from toolq.cli.bench_report import PROJECT
from toolq.workers.runtime import launch
from toolq.workers.runtime.bun import WRAPPER, find_bun
from toolq.workers.runtime.limits import Cgroups, ResourceLimits, cgjoin, joining
from toolq.workers.runtime.sandbox import Permissions, Sandbox, make_sandbox

LIMITS = ResourceLimits(512, 256, 1024, None)
FLOOR = PROJECT / "floor.ts"
LAYERS = (
    "irreducible sandboxed start",
    "+ toolq's wrapper",
    "+ the wrapper's guards",
    "+ uid drop step (no cgroup)",
    "+ a cgroup: the worker's launch",
)
REQUEST = (
    b'{"tool_id":"noop","tool_exec_id":"bench","input":{},"config":{},"env":{},'
    b'"timeout_ms":30000,"nonce":"n"}'
)
CPUACCT = Path("/sys/fs/cgroup/cpuacct")


@contextlib.contextmanager
def cpu_clock() -> Iterator[Callable[[], float]]:
    """CPU seconds of this process and all it starts."""
    group = CPUACCT / f"toolq-spawn-floor-{uuid.uuid4().hex[:8]}"
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
        time.sleep(0.2)  # the last children gone
        with contextlib.suppress(OSError):
            group.rmdir()


def captured_launch(
    bun: Path, sandbox: Sandbox, cgroups: Cgroups | None
) -> tuple[list[str], dict[str, Any]]:
    """The argv and Popen options of one sandboxed launch as the worker makes it (not
    started)."""
    seen: dict[str, Any] = {}

    class Captured(OSError):
        """An OSError: the launcher then removes the cgroup it made and closes its pipe."""

    def popen(argv: list[str], **options: Any) -> None:
        seen.update(argv=argv, options=options)
        raise Captured

    real = subprocess.Popen
    subprocess.Popen = popen  # type: ignore[assignment,misc]  # the launcher's, for one launch
    try:
        launcher = launch.Launcher(
            bun, PROJECT / "entrypoint.ts", PROJECT, sandbox=sandbox, cgroups=cgroups
        )
        launcher.launch(
            permissions=Permissions(), limits=LIMITS, env=launch.base_environment(), warm=False
        )
    except OSError:
        if not seen:
            raise
    finally:
        subprocess.Popen = real  # type: ignore[misc]
    return seen["argv"], seen["options"]


def measure(runs: int = 20, pause_s: float = 0.01) -> dict[str, list[float]] | None:
    """CPU ms per process of each layer (:data:`LAYERS`), ``runs`` each, interleaved;
    None where a sandbox or cgroups cannot be made here."""
    bun = find_bun(None, PROJECT)
    cgroups = Cgroups.detect()
    try:
        sandbox = make_sandbox("auto", bun, WRAPPER, PROJECT)
    except Exception:  # a sandbox this host refuses: nothing to compare
        return None
    if sandbox is None or cgroups is None:
        return None
    argv, options = captured_launch(bun, sandbox, cgroups)
    bwrap_at = next(i for i, arg in enumerate(argv) if arg.endswith("bwrap"))
    sandboxed = argv[bwrap_at:]
    bun_at = sandboxed.index("--") + 1
    wrapped = sandboxed[bun_at:]  # bun <3 flags> wrapper.ts <entrypoint> <fd> spawn [opts]
    floor = [*sandboxed[:bun_at], str(bun), "--smol", "--no-install", "--no-env-file",
             str(FLOOR), wrapped[5], wrapped[6]]  # fmt: skip
    bare = [*sandboxed[:bun_at], *wrapped[:8]]
    uid = sandbox.run_as

    def dropping(group: Any) -> list[str]:
        if group is not None:
            return joining(group, LIMITS, sandboxed, uid)
        if cgjoin() is not None:  # cgjoin without -c: the drop alone
            step = [str(cgjoin()), "-n", str(LIMITS.max_open_files)]
            return [*step, *(["-u", str(uid)] if uid is not None else []), "--", *sandboxed]
        script = argv[2]  # the shell's: joins, then `ulimit -n`, then exec setpriv
        return ["/bin/sh", "-c", script[script.index("ulimit") :], "toolq-join", *sandboxed]

    def run(line: list[str]) -> None:
        """Run ``line`` with a fresh envelope pipe and seccomp fd; check the call."""
        line = list(line)
        read_fd, write_fd = os.pipe()
        seccomp = sandbox.seccomp_fd()
        fds = [write_fd, seccomp]
        line[line.index("--seccomp") + 1] = str(seccomp)
        at = len(line) - 1 - line[::-1].index(str(bun))  # Bun itself
        line[at + 6] = str(write_fd)  # bun <3 flags> <script> <entrypoint> <fd>
        proc = subprocess.Popen(
            line, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=fds, cwd=PROJECT, env=options["env"], start_new_session=True,
        )  # fmt: skip
        for fd in fds:
            os.close(fd)
        _, stderr = proc.communicate(REQUEST)
        with os.fdopen(read_fd, "rb") as envelope:
            if b'"error":null' not in envelope.read():
                raise RuntimeError(f"the call failed: {stderr.decode(errors='replace')[-500:]}")

    def with_cgroup() -> None:
        group = cgroups.create(LIMITS)
        try:
            run(dropping(group))
        finally:
            group.remove()

    layers: dict[str, Callable[[], None]] = dict(
        zip(
            LAYERS,
            (
                lambda: run(floor),
                lambda: run(bare),
                lambda: run(sandboxed),
                lambda: run(dropping(None)),
                with_cgroup,
            ),
            strict=True,
        )
    )
    used: dict[str, list[float]] = {name: [] for name in layers}
    with cpu_clock() as clock:
        for _ in range(runs):
            for name, layer in layers.items():
                before = clock()
                layer()
                used[name].append((clock() - before) * 1000)
                time.sleep(pause_s)
    return used
