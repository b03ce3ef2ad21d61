"""Spawn mode's processes started ahead of demand: each serves exactly one call, is
replaced in the background, carries nothing to the next call, and dies with its runtime
or its worker."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    TOOLS_CONFIG,
    StartWorker,
    descendants,
    process_alive,
    wait_until,
)
from tests.test_runner import TOOL_PERMISSIONS, make_runner, run
from toolq.config.settings import TimeLimits
from toolq.producers.client import ToolClient
from toolq.workers.runtime import spawn as spawn_module
from toolq.workers.runtime.base import DEFAULT_RESOURCES, Call
from toolq.workers.runtime.spawn import SpawnRuntime

KEY = (TOOL_PERMISSIONS, DEFAULT_RESOURCES)


@pytest.fixture
def spawn(bun: Path) -> Iterator[SpawnRuntime]:
    runtime = make_runner("spawn", bun)
    assert isinstance(runtime, SpawnRuntime) and runtime.ahead == 2
    assert wait_until(lambda: len(runtime.ready(KEY)) == 2, 20)
    yield runtime
    runtime.close()


def ready_pids(runtime: SpawnRuntime) -> list[int]:
    return [fresh.launched.pid for fresh in runtime.ready(KEY)]


def test_the_teardown_and_the_replacement_wait_for_the_reply(
    spawn: SpawnRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26: killing an answered process and starting its replacement (~25 ms of CPU)
    happen once the worker settles (after the reply is stored), not while the call runs
    or its reply is on its way; a replacement starts at once only when the next process
    in line has not loaded yet."""
    # What nobody settles is settled in the background after 50 ms: on a loaded machine
    # this test could be descheduled that long between the call and its checks.
    monkeypatch.setattr(spawn_module, "SETTLE_GRACE_S", 60.0)
    assert wait_until(lambda: all(fresh.loaded() for fresh in spawn.ready(KEY)), 20)
    taken, waiting = spawn.ready(KEY)
    cgroup = taken.launched.cgroup
    assert cgroup is not None
    call = Call("pid", "exec-1", {}, {}, TimeLimits(5, 6), permissions=TOOL_PERMISSIONS)
    outcome = spawn.run(call)  # as the worker runs it: settled after the reply
    assert outcome.error is None, outcome.error
    assert all(path.exists() for path in cgroup.dirs.values())  # not torn down yet
    assert spawn.ready(KEY) == [waiting]  # and no replacement started yet
    spawn.settle()
    assert wait_until(lambda: not any(path.exists() for path in cgroup.dirs.values()), 10)
    assert wait_until(lambda: len(spawn.ready(KEY)) == 2, 20)


def test_a_call_takes_a_process_that_was_started_before_it(spawn: SpawnRuntime) -> None:
    waiting = ready_pids(spawn)
    outcome = run(spawn, "echo", {"a": 1})
    assert outcome.result == {"echo": {"a": 1}}
    assert waiting[0] not in ready_pids(spawn)  # the oldest one served it...
    assert wait_until(lambda: not process_alive(waiting[0]))  # ...and is gone
    assert waiting[1] in ready_pids(spawn)


def test_each_process_serves_exactly_one_call(spawn: SpawnRuntime) -> None:
    served = [run(spawn, "module_counter").result for _ in range(6)]
    assert [r["calls"] for r in served] == [1] * 6  # type: ignore[index]
    assert len({r["pid"] for r in served}) == 6  # type: ignore[index]


def test_a_used_process_is_replaced_in_the_background(spawn: SpawnRuntime) -> None:
    before = set(ready_pids(spawn))
    for _ in range(3):
        assert run(spawn, "echo", {}).error is None
    assert wait_until(lambda: len(spawn.ready(KEY)) == 2, 20)
    after = set(ready_pids(spawn))
    assert len(after & before) == 0  # three calls: both waiting ones used, two new ones
    assert all(fresh.alive() for fresh in spawn.ready(KEY))


def test_nothing_of_a_call_reaches_the_next(spawn: SpawnRuntime) -> None:
    seen = run(spawn, "env", {"keys": ["SECRET"]}, env={"SECRET": "abc"})
    assert seen.result == {"env": {"SECRET": "abc"}}  # the env travels in the request
    assert run(spawn, "env", {"keys": ["SECRET"]}).result == {"env": {"SECRET": None}}
    written = run(spawn, "tmp_write")
    assert written.error is None
    listing = run(spawn, "tmp_list").result
    assert listing is not None and listing["entries"] == []  # a TMPDIR of its own


def test_a_process_that_died_while_waiting_is_not_used(spawn: SpawnRuntime) -> None:
    doomed = spawn.ready(KEY)[0]
    os.killpg(doomed.launched.pid, signal.SIGKILL)
    assert wait_until(lambda: not doomed.alive())
    outcome = run(spawn, "echo", {"still": "serving"})
    assert outcome.result == {"echo": {"still": "serving"}}
    assert doomed not in spawn.ready(KEY)


def test_waiting_processes_are_killed_when_the_runtime_closes(bun: Path) -> None:
    runtime = make_runner("spawn", bun)
    assert isinstance(runtime, SpawnRuntime)
    assert wait_until(lambda: len(runtime.ready(KEY)) == 2, 20)
    pids = ready_pids(runtime)
    assert run(runtime, "echo", {}).error is None
    runtime.close()
    assert wait_until(lambda: not any(process_alive(pid) for pid in pids))
    assert runtime.ready(KEY) == []


def test_a_cold_runtime_starts_nothing_ahead(bun: Path) -> None:
    cold = make_runner("spawn-cold", bun)
    assert isinstance(cold, SpawnRuntime)
    assert run(cold, "echo", {}).error is None
    assert cold.ready(KEY) == []
    cold.close()


def _bun_processes_below(pid: int) -> list[int]:
    found = []
    for child in descendants(pid):
        try:
            with open(f"/proc/{child}/comm") as comm:
                if comm.read().strip() in ("bun", "bwrap"):
                    found.append(child)
        except OSError:
            continue
    return found


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_a_spawn_worker_starts_processes_ahead_and_they_die_with_it(
    start_worker: StartWorker, client: ToolClient, stop: str
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    worker = start_worker(config=TOOLS_CONFIG, queues=[queue], env={"TOOLQ_RUNTIME__MODE": "spawn"})
    # Two processes ahead of the first call, before any call came (bwrap + Bun each).
    assert wait_until(lambda: len(_bun_processes_below(worker.pid)) >= 2, 20)
    first = client.enqueue("module_counter", {}, queue=queue).result(timeout=30)
    second = client.enqueue("module_counter", {}, queue=queue).result(timeout=30)
    assert first.ok and second.ok
    assert first.result["calls"] == second.result["calls"] == 1  # type: ignore[index]
    assert first.result["pid"] != second.result["pid"]  # type: ignore[index]
    # Their replacements, once past the joining shell (a start takes a few ms: looking
    # at once found none in a CI run).
    assert wait_until(lambda: len(_bun_processes_below(worker.pid)) >= 2, 20)
    waiting = _bun_processes_below(worker.pid)
    if stop == "sigterm":
        worker.stop()
    else:
        worker.kill()  # the reaper kills what the worker can no longer
    assert wait_until(lambda: not any(process_alive(pid) for pid in waiting), 15)


def test_a_prefork_pool_process_keeps_one_process_ahead_and_uses_each_once(
    start_worker: StartWorker, client: ToolClient
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    worker = start_worker(
        config=TOOLS_CONFIG,
        queues=[queue],
        pool="prefork",
        concurrency=1,
        env={"TOOLQ_RUNTIME__MODE": "spawn"},
    )
    served = [client.run("module_counter", {}, queue=queue, wait=30) for _ in range(3)]
    assert all(result.ok for result in served)
    assert [r.result["calls"] for r in served] == [1, 1, 1]  # type: ignore[index]
    assert len({r.result["pid"] for r in served}) == 3  # type: ignore[index]
    # After the first call the pool process keeps one started ahead (bwrap + Bun).
    assert wait_until(lambda: len(_bun_processes_below(worker.pid)) >= 1, 20)


@pytest.mark.parametrize("broken", [1, 2])
def test_a_sandbox_that_fails_to_start_is_replaced_once(bun: Path, broken: int) -> None:
    """bwrap refuses to start when a host path it was to cover went away in between (a
    socket another program removed with its directory): the call, which never reached
    Bun, runs in a new sandbox — once; a sandbox that cannot start at all is the call's
    crash."""
    runtime = make_runner("spawn-cold", bun)
    assert isinstance(runtime, SpawnRuntime) and runtime.launcher.sandbox is not None
    sandbox = runtime.launcher.sandbox
    command = sandbox.command
    launches = []

    def failing_first(*args: Any, **options: Any) -> list[str]:
        argv = command(*args, **options)
        launches.append(argv)
        if len(launches) <= broken:  # a destination whose parent is gone: bwrap gives up
            at = argv.index("--chdir")
            argv[at:at] = ["--ro-bind", "/dev/null", f"/toolq-gone-{uuid.uuid4().hex}/s.sock"]
        return argv

    sandbox.command = failing_first  # type: ignore[method-assign]
    try:
        outcome = run(runtime, "pid")
    finally:
        runtime.close()
    assert len(launches) == 2
    if broken == 1:
        assert outcome.error is None and outcome.result is not None
    else:
        assert outcome.error is not None and outcome.error.kind == "crashed"
        assert "bwrap" in (outcome.error.stderr or "")
