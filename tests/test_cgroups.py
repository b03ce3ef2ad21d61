"""Per-process cgroups go when their process does — with real Bun, sandbox and cgroups:
a cgroup left behind holds kernel memory and, on cgroup v1, one of 65,535 memory
cgroup ids for good."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import StartWorker, wait_until
from tests.test_runner import make_launcher, run
from toolq import ToolClient
from toolq.workers.runtime.limits import Cgroup, Cgroups, ResourceLimits, cgjoin, joining
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime

CGROUPS = Cgroups.detect()
pytestmark = pytest.mark.skipif(CGROUPS is None, reason="no cgroup can be made here")


@pytest.mark.parametrize("mode", ["spawn", "spawn-cold", "warm"])
def test_every_cgroup_a_runtime_made_is_gone_after_its_processes(bun: Path, mode: str) -> None:
    launcher = make_launcher(bun)
    assert launcher.cgroups is not None
    made: list[Cgroup] = []
    create = launcher.cgroups.create

    def recorded(limits: ResourceLimits) -> Cgroup:
        made.append(create(limits))
        return made[-1]

    launcher.cgroups.create = recorded  # type: ignore[method-assign]
    runtime: SpawnRuntime | WarmRuntime
    if mode == "warm":  # a process retired after every 2 calls, then the pool closed
        runtime = WarmRuntime(launcher, 2, max_calls_per_process=2, max_rss_mb=1024)
    else:
        runtime = SpawnRuntime(launcher, ahead=2 if mode == "spawn" else 0)
    for n in range(8):
        assert run(runtime, "echo", {"n": n}).result == {"echo": {"n": n}}
    runtime.close()
    assert len(made) >= 4
    paths = [path for group in made for path in group.dirs.values()]
    # Killed processes take a moment to exit; their cgroups go then, not never.
    assert wait_until(lambda: not any(path.exists() for path in paths), 20), [
        str(path) for path in paths if path.exists()
    ]


def test_a_dead_workers_cgroups_are_swept_and_a_live_ones_kept() -> None:
    assert CGROUPS is not None
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead_pid = ended.pid  # a worker that is gone
    suffix = uuid.uuid4().hex[:8]
    parents = set(CGROUPS.parents.values())
    gone = [parent / f"toolq-{dead_pid}-{suffix}" for parent in parents]
    kept = [parent / f"toolq-{os.getpid()}-{suffix}" for parent in parents]
    for path in gone + kept:
        path.mkdir()
    try:
        removed = CGROUPS.sweep()
        assert {str(path) for path in gone} <= set(removed)
        assert not any(path.exists() for path in gone)
        assert all(path.exists() for path in kept)  # this worker is alive
    finally:
        for path in gone + kept:
            if path.exists():
                path.rmdir()


def test_a_dead_workers_busy_cgroup_is_removed_once_its_processes_exit() -> None:
    """A worker SIGKILLed and restarted at once: its killed Bun processes may still be
    exiting when the new worker sweeps (the start-up sweep missed them for good)."""
    assert CGROUPS is not None
    ended = subprocess.Popen(["true"])
    ended.wait()
    suffix = uuid.uuid4().hex[:8]
    busy = [parent / f"toolq-{ended.pid}-{suffix}" for parent in set(CGROUPS.parents.values())]
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        for path in busy:
            path.mkdir()
            (path / "cgroup.procs").write_text(str(sleeper.pid))
        CGROUPS.sweep()
        assert all(path.exists() for path in busy)  # a process is still in it: kept
        sleeper.kill()
        sleeper.wait()
        assert wait_until(lambda: not any(path.exists() for path in busy), 20)
    finally:
        sleeper.kill()
        sleeper.wait()
        for path in busy:
            if path.exists():
                path.rmdir()


@pytest.mark.parametrize("mode", ["warm", "spawn"])
def test_a_worker_stopped_by_sigterm_leaves_no_cgroup(
    start_worker: StartWorker, client: ToolClient, mode: str
) -> None:
    worker = start_worker(env={"TOOLQ_RUNTIME__MODE": mode})
    queue = next(arg.split("=", 1)[1] for arg in worker.argv if arg.startswith("--queues="))
    assert client.map("echo", [{"n": n} for n in range(8)], queue=queue, wait=60)
    pid = worker.pid
    assert worker.stop() == 0
    parents = set(CGROUPS.parents.values()) if CGROUPS is not None else set()
    left = [p for parent in parents for p in parent.glob(f"toolq-{pid}-*")]
    assert left == []


@pytest.mark.skipif(cgjoin() is None, reason="make setup builds workers/runtime/cgjoin")
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to the tools' uid needs root")
def test_cgjoin_joins_limits_and_drops_before_the_program_runs() -> None:
    """The launcher's step before bwrap (workers/runtime/cgjoin.c, one exec instead of a
    shell and setpriv): the program runs in the cgroup, with the open-file limit, as the
    tools' uid and no other group; a join that fails stops it before it runs."""
    assert CGROUPS is not None
    limits = ResourceLimits(64, 16, 77, None)
    group = CGROUPS.create(limits)
    try:
        script = "id -u; id -g; id -G; ulimit -n; cat /proc/self/cgroup"
        argv = joining(group, limits, ["sh", "-c", script], 65534)
        assert argv[0] == cgjoin()
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split("\n")
        assert out[:4] == ["65534", "65534", "65534", "77"]
        memberships = "\n".join(out[4:])  # /proc/self/cgroup
        assert all(f"/{path.name}\n" in memberships for path in group.dirs.values()), out
        gone = Cgroup({"memory": Path("/sys/fs/cgroup/nonexistent-toolq")}, group.version)
        failed = subprocess.run(
            joining(gone, limits, ["sh", "-c", "echo ran"], 65534), capture_output=True, text=True
        )
        assert failed.returncode == 126 and "ran" not in failed.stdout
    finally:
        group.remove()
