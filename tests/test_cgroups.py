"""Per-process cgroups go when their process does — with real Bun, sandbox and cgroups:
a cgroup left behind holds kernel memory and, on cgroup v1, one of 65,535 memory
cgroup ids for good."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.test_runner import make_launcher, run
from toolq.workers.runtime.limits import Cgroup, Cgroups, ResourceLimits
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
