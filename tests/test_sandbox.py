"""The sandbox: each permission absent and present, resource limits, and their cost.

bubblewrap must be installed (`make test` installs it where it can): these tests fail,
not skip, without it — a sandbox that silently does not run is the failure to catch.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOOLS, processes_running, wait_until
from toolq.config.settings import TimeLimits
from toolq.errors import ConfigError
from toolq.workers.runtime.base import DEFAULT_RESOURCES, Call, Outcome
from toolq.workers.runtime.bun import WRAPPER
from toolq.workers.runtime.launch import Launcher
from toolq.workers.runtime.limits import Cgroups, ResourceLimits
from toolq.workers.runtime.sandbox import Permissions, make_sandbox
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime

SCRATCH = TOOLS / ".tmp"


@pytest.fixture(scope="module")
def launcher(bun: Path) -> Launcher:
    sandbox = make_sandbox("required", bun, WRAPPER, TOOLS)  # ConfigError if bwrap is missing
    return Launcher(bun, TOOLS / "entrypoint.ts", TOOLS, sandbox=sandbox, cgroups=Cgroups.detect())


def call(
    launcher: Launcher,
    tool_id: str,
    payload: Any,
    flags: list[str],
    resources: ResourceLimits = DEFAULT_RESOURCES,
    env: dict[str, str] | None = None,
    timeout_s: float = 10,
) -> Outcome:
    """One call in spawn mode, on a process started ahead of it (in its sandbox and
    cgroup before the call was known), as a worker runs it."""
    permissions = Permissions.parse(flags)
    runner = SpawnRuntime(launcher, ahead=1)
    runner.start([(permissions, resources)])
    try:
        assert wait_until(lambda: bool(runner.ready((permissions, resources))), 20)
        return runner.run(
            Call(
                tool_id,
                "sandbox-test",
                payload,
                env or {},
                TimeLimits(timeout_s, timeout_s + 2),
                permissions=permissions,
                resources=resources,
            )
        )
    finally:
        runner.close()


def probe(launcher: Launcher, flags: list[str], **payload: Any) -> dict[str, Any]:
    outcome = call(launcher, "probe", payload, flags)
    assert outcome.result is not None, outcome.error
    return outcome.result


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory outside the project (and outside pytest's basetemp, which is inside it)."""
    path = Path("/var/tmp") / f"toolq-sandbox-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    path.chmod(0o777)  # writable by the tool's uid (65534) when it is granted
    (path / "secret.txt").write_text("host data")
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_nothing_granted_means_nothing_outside(launcher: Launcher, outside: Path) -> None:
    SCRATCH.mkdir(exist_ok=True)
    assert not probe(launcher, [], action="read", path=str(outside / "secret.txt"))["ok"]
    assert not probe(launcher, [], action="read", path="/etc/hostname")["ok"]
    assert not probe(launcher, [], action="write", path=str(outside / "new.txt"))["ok"]
    assert not probe(launcher, [], action="write", path=str(SCRATCH / "x.txt"))["ok"]
    assert not probe(launcher, [], action="connect", port=6379)["ok"]
    assert not probe(launcher, [], action="run")["ok"]
    assert not probe(launcher, [], action="read", path="/sys/devices/system/cpu/online")["ok"]
    # the project itself is readable: that is where the tools live
    assert probe(launcher, [], action="read", path=str(TOOLS / "compozy.yaml"))["ok"]


def test_allow_read(launcher: Launcher, outside: Path) -> None:
    target = str(outside / "secret.txt")
    assert probe(launcher, ["--allow-read"], action="read", path=target)["text"] == "host data"
    assert probe(launcher, [f"--allow-read={outside}"], action="read", path=target)["ok"]
    assert not probe(launcher, [f"--allow-read={outside}"], action="read", path="/etc/hostname")[
        "ok"
    ]
    assert not probe(launcher, ["--allow-read"], action="write", path=str(outside / "w"))["ok"]


def test_allow_write(launcher: Launcher, outside: Path, tmp_path: Path) -> None:
    inside = tmp_path / f"w-{uuid.uuid4().hex[:6]}.txt"  # in the project (basetemp is)
    assert inside.is_relative_to(TOOLS)
    assert probe(launcher, ["--allow-write"], action="write", path=str(inside))["ok"]
    assert inside.read_text() == "written"
    inside.unlink()
    assert not probe(launcher, ["--allow-write"], action="write", path=str(outside / "w.txt"))["ok"]
    assert probe(
        launcher, [f"--allow-write={outside}"], action="write", path=str(outside / "w.txt")
    )["ok"]
    assert (outside / "w.txt").read_text() == "written"


def test_allow_net(launcher: Launcher) -> None:
    """--allow-net is the public network: the sandbox's own loopback has nothing on it,
    and the worker's Redis (6379 here) is not reachable (tests/test_network.py)."""
    assert not probe(launcher, ["--allow-net"], action="connect", port=6379)["ok"]


def test_allow_env(launcher: Launcher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_ONLY_SETTING", "worker-value")
    assert not probe(launcher, [], action="env", name="WORKER_ONLY_SETTING")["ok"]
    granted = probe(launcher, ["--allow-env"], action="env", name="WORKER_ONLY_SETTING")
    assert granted == {"ok": True, "value": "worker-value"}


def test_allow_run(launcher: Launcher) -> None:
    assert probe(launcher, ["--allow-run"], action="run")["ok"]


def test_allow_sys(launcher: Launcher) -> None:
    granted = probe(launcher, ["--allow-sys"], action="read", path="/sys/devices/system/cpu/online")
    assert granted["ok"], granted


def test_unknown_permission_is_a_config_error(tmp_path: Path) -> None:
    from toolq.config import load_settings

    config = tmp_path / "c.yaml"
    config.write_text("runtime:\n  permissions: [--allow-evrything]\n")
    with pytest.raises(ConfigError, match="unknown permission"):
        load_settings(config, environ={})


def test_required_sandbox_refuses_to_start_without_bwrap(
    bun: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="apt-get install bubblewrap"):
        make_sandbox("required", bun, WRAPPER, TOOLS)
    assert make_sandbox("auto", bun, WRAPPER, TOOLS) is None
    assert "UNSANDBOXED" in caplog.text
    assert make_sandbox("off", bun, WRAPPER, TOOLS) is None


def test_auto_runs_unsandboxed_where_bwrap_cannot_start_and_says_why(
    bun: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 22: a host whose bwrap cannot make namespaces is one that cannot sandbox: auto
    warns (bwrap's error, the user-namespace hint) and runs unsandboxed, without telling the
    user to install the bubblewrap they have; required refuses."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert make_sandbox("auto", bun, WRAPPER, TOOLS) is None
    assert "UNSANDBOXED" in caplog.text and "No permissions to create new namespace" in caplog.text
    assert "user namespaces" in caplog.text and "apt-get install" not in caplog.text
    with pytest.raises(ConfigError, match="bubblewrap cannot start a sandbox here"):
        make_sandbox("required", bun, WRAPPER, TOOLS)


# -- resource limits -----------------------------------------------------------------------

LIMITS = ResourceLimits(max_memory_mb=200, max_processes=48, max_open_files=256, max_cpu_time_s=0.5)


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_memory_hog_is_stopped_as_memory_exceeded(launcher: Launcher, mode: str) -> None:
    flags = ["--allow-read"]
    if mode == "spawn":
        outcome = call(launcher, "memory_hog", {}, flags, LIMITS)
        after = call(launcher, "echo", {"still": "serving"}, flags, LIMITS)
    else:
        pool = WarmRuntime(
            launcher,
            1,
            max_calls_per_process=100,
            max_rss_mb=1024,
            permissions=Permissions.parse(flags),
            resources=LIMITS,
        )
        try:
            hog = Call("memory_hog", "m", {}, {}, TimeLimits(10, 12))
            outcome = pool.run(hog)
            after = pool.run(Call("echo", "e", {"still": "serving"}, {}, TimeLimits(5, 6)))
        finally:
            pool.close()
    assert outcome.error is not None and outcome.error.kind == "memory_exceeded", outcome
    assert "200 MB" in outcome.error.message
    assert outcome.total_time_ms < 8000  # stopped by the limit, not by the 10 s timeout
    assert after.result == {"echo": {"still": "serving"}}


def test_cpu_hog_is_stopped_at_its_cpu_time_limit(launcher: Launcher) -> None:
    outcome = call(launcher, "busy_loop", {}, ["--allow-read"], LIMITS, timeout_s=20)
    assert outcome.error is not None and outcome.error.kind == "timeout"
    assert "CPU time limit" in outcome.error.message
    assert outcome.total_time_ms < 10_000


def test_fork_bomb_is_bounded_and_cleaned_up(launcher: Launcher) -> None:
    assert launcher.cgroups is not None, "no cgroup here: process limits cannot be tested"
    outcome = call(launcher, "fork_bomb", {"max": 300}, ["--allow-read", "--allow-run"], LIMITS)
    if outcome.result is not None:  # the tool saw its spawns refused...
        assert outcome.result["spawned"] < LIMITS.max_processes
        assert outcome.result["refused"] > 0
    else:  # ...or Bun itself gave up when it could not start a thread: still contained
        assert outcome.error is not None and outcome.error.kind == "crashed", outcome.error
    assert wait_until(lambda: not processes_running("sleep", "5"), 10)
    after = call(launcher, "echo", {"after": "bomb"}, ["--allow-read"], LIMITS)
    assert after.result == {"echo": {"after": "bomb"}}


def test_open_files_are_limited(launcher: Launcher, bun: Path) -> None:
    outcome = call(
        launcher, "probe", {"action": "read", "path": "/proc/self/limits"}, ["--allow-read"], LIMITS
    )
    assert outcome.result is not None
    limits_text = outcome.result["text"]
    assert limits_text  # readable; the limit itself is checked below
    full = call(launcher, "open_files_limit", {}, ["--allow-read"], LIMITS)
    assert full.result == {"limit": 256}


def test_sandbox_environment_is_only_what_the_call_passes(launcher: Launcher) -> None:
    outcome = call(launcher, "env_keys", {}, [], env={"API_TOKEN": "t"})
    assert outcome.result is not None
    allowed = {"PATH", "HOME", "LANG", "TMPDIR", "API_TOKEN", "PWD"}
    assert set(outcome.result["keys"]) <= allowed | {"COMPOZY_RUNTIME", "COMPOZY_PROJECT_ROOT"}
    assert os.environ.get("HOME") is None or "HOME" in outcome.result["keys"]


def test_project_under_tmp_with_entrypoint_elsewhere(bun: Path) -> None:
    """The private /tmp must not hide a project that lives under /tmp."""
    project = Path("/tmp") / f"toolq-project-{uuid.uuid4().hex[:8]}"
    project.mkdir()
    try:
        entrypoint = TOOLS / "entrypoint.ts"
        sandbox = make_sandbox("required", bun, WRAPPER, project, entrypoint)
        launcher = Launcher(bun, entrypoint, project, sandbox=sandbox)
        outcome = call(launcher, "echo", {"from": "tmp"}, [])
        assert outcome.result == {"echo": {"from": "tmp"}}, outcome.error
    finally:
        project.rmdir()


# -- sandbox: auto never downgrades for a fixable reason (issue 22) -------------------------

MINIMAL_TOOL = "export default { async echo(input: unknown) { return { echo: input }; } };\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="a root worker runs tools as uid 65534")
def test_auto_refuses_a_project_the_tools_uid_cannot_read(
    client: Any, start_worker: Any, redis_url: str
) -> None:
    """Issue 22: under the default `sandbox: auto`, a root worker whose project is in a
    `mktemp -d` directory (0700) started with no sandbox at all, its log telling the user to
    install bubblewrap (installed). It now refuses to start, naming the path and the chmod;
    so does a grant the tools' uid cannot use (each call failed in bwrap before); once
    fixed it runs tools sandboxed, and `toolq status` says so per worker (and says so of a
    worker with sandbox off)."""
    import tempfile

    from tests.test_resilience import toolq

    project = Path(tempfile.mkdtemp(prefix="toolq-0700-"))  # 0700, as mktemp -d makes it
    closed = Path(tempfile.mkdtemp(prefix="toolq-closed-"))
    try:
        (project / "entrypoint.ts").write_text(MINIMAL_TOOL)
        config = project / "compozy.yaml"
        grant, absent = closed / "out", f"/nonexistent-{uuid.uuid4().hex[:8]}"
        grant.mkdir()
        config.write_text(
            "name: toolq-test-tools\nruntime:\n  entrypoint: ./entrypoint.ts\n"
            f"  permissions: [--allow-write={grant}, --allow-read={absent}]\n"
        )
        (project / "off.yaml").write_text(
            "name: toolq-test-tools\nruntime:\n  entrypoint: ./entrypoint.ts\n  sandbox: off\n"
        )
        queue = f"q-{uuid.uuid4().hex[:8]}"
        with pytest.raises(RuntimeError) as refused:
            start_worker(config=config, queues=[queue])
        said = str(refused.value)
        assert f"cannot read {project}" in said and f"chmod o+rX {project}" in said, said
        assert "UNSANDBOXED" not in said and "apt-get install" not in said, said

        project.chmod(0o755)
        with pytest.raises(RuntimeError) as refused:
            start_worker(config=config, queues=[queue])
        said = str(refused.value)
        assert f"--allow-write={grant}: the tools' uid 65534 cannot write it" in said, said
        assert f"chmod o+x {closed} && chown 65534 {grant}" in said, said

        closed.chmod(0o711)
        os.chown(grant, 65534, 65534)
        worker = start_worker(config=config, queues=[queue])
        assert f"--allow-read={absent}: does not exist on this worker" in worker.output()
        result = client.run("echo", {"a": 1}, queue=queue, wait=60)
        assert result.ok and result.metadata["sandbox"] == "bwrap", result
        unsandboxed = start_worker(config=project / "off.yaml", queues=[f"{queue}-off"])

        report = json.loads(toolq(redis_url, "status", "--json").stdout)
        nodes = {node["name"]: node for node in report["workers"]}
        assert nodes[worker.hostname]["sandboxed"] is True, nodes
        assert nodes[unsandboxed.hostname]["sandboxed"] is False, nodes
        table = toolq(redis_url, "status").stdout
        assert "NO (runtime.sandbox: off)" in table and "yes (bwrap)" in table, table
    finally:
        shutil.rmtree(project, ignore_errors=True)
        shutil.rmtree(closed, ignore_errors=True)


def test_a_host_socket_gone_since_the_last_look_does_not_stop_a_sandbox(
    launcher: Launcher,
) -> None:
    """Under --allow-read every host unix socket is covered; the list is up to a second
    old, and a socket removed in between (with its directory) made bwrap refuse to start
    the sandbox ("Can't mkdir parents … Read-only file system"): a CI run met it when
    another test's socket went away."""
    import shutil
    import socket

    directory = Path("/var/tmp") / f"toolq-gone-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(directory / "db.sock"))
        server.listen(1)
        # the first sandbox lists (and covers) it
        assert probe(launcher, ["--allow-read"], action="read", path="/etc/hostname")["ok"]
    finally:
        server.close()
        shutil.rmtree(directory)
    # the next one, within the same second, must not try to cover what is gone
    assert probe(launcher, ["--allow-read"], action="read", path="/etc/hostname")["ok"]
