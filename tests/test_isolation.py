"""Warm mode's call boundary, with real sandboxed Bun processes: nothing a call leaves
behind — a detached process, files in /tmp or /dev/shm, a pending timer — reaches the
next call; ``isolation: strict`` gives a process per call."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StartWorker, wait_until
from tests.test_runner import make_launcher, make_runner, run
from toolq.producers.client import ToolClient
from toolq.workers.runtime.sandbox import Permissions
from toolq.workers.runtime.warm import WarmRuntime


@pytest.fixture
def pool(bun: Path) -> Iterator[WarmRuntime]:
    """One warm process: every call below is served by the same Bun."""
    warm = make_runner("warm", bun, 1)
    assert isinstance(warm, WarmRuntime)
    yield warm
    warm.close()


def running_with(token: str) -> list[int]:
    """Host pids whose command line holds ``token`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if token.encode() not in cmdline.read():
                    continue
            with open(f"/proc/{entry}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def test_a_detached_grandchild_dies_with_its_call(pool: WarmRuntime, tmp_path: Path) -> None:
    token = f"spy-{uuid.uuid4().hex}"
    copied = tmp_path / "copied"
    spawned = run(pool, "detached_spy", {"token": token, "out": str(copied)})
    assert spawned.result == {"spawned": True}
    assert wait_until(lambda: not running_with(token), 5), "the detached spy outlived its call"
    # the next caller's scratch file is not copied by anything the first call started
    nxt = run(pool, "tmpdir_secret", {"text": "next caller's secret", "ms": 600})
    assert nxt.result == {"ok": True}
    assert "next caller's secret" not in (copied.read_text() if copied.exists() else "")


def test_tmp_and_dev_shm_are_fresh_for_the_next_call(pool: WarmRuntime) -> None:
    before = run(pool, "scratch_look").result
    assert before is not None and before["found"] == []
    planted = run(pool, "scratch_plant").result
    assert planted is not None and planted["ok"]
    assert planted["shm"] in ("planted", "read-only")  # read-only: nothing can be left there
    after = run(pool, "scratch_look").result
    assert after is not None
    assert after["found"] == []  # /tmp/planted*, /dev/shm/planted.txt gone
    assert after["tmp"] == before["tmp"]  # what is mounted under /tmp (TMPDIR) is kept
    assert run(pool, "tmp_list").result["entries"] == []  # type: ignore[index]


@pytest.mark.parametrize("move", [False, True])
def test_a_planted_link_never_leads_the_clean_up_out_of_the_sandbox(
    bun: Path, tmp_path: Path, move: bool
) -> None:
    """A granted path under /tmp makes directories on the sandbox's /tmp that the
    clean-up keeps; links planted there (or in their place) point at a host directory."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("host data")
    host = Path(tempfile.mkdtemp(prefix="toolq-test-"))  # on the host's /tmp
    (host / "granted").mkdir()
    host.chmod(0o755)  # tools run as an unprivileged uid: it must reach the granted path
    (host / "granted").chmod(0o777)
    leading = str(host)  # inside the sandbox: a directory on its /tmp, holding a mount
    permissions = Permissions.parse(["--allow-read", f"--allow-write={host}/granted"])
    pool = WarmRuntime(
        make_launcher(bun), 1, max_calls_per_process=100, max_rss_mb=512, permissions=permissions
    )
    pool.start()
    try:
        attack = run(
            pool, "scratch_attack", {"victim": str(victim), "leading": leading, "move": move}
        )
        assert attack.result is not None and attack.result["moved"] == move
        planted = ["/tmp/evil", f"{leading}/junk.txt", f"{leading}/evil", "/tmp/moved"]
        look = run(pool, "lexists", {"paths": [*planted, f"{leading}/granted"]}).result
        assert look is not None
        if move:  # the mount moved with its directory: the process is retired, not cleaned
            assert look["pid"] != attack.result["pid"]
        else:
            assert look["pid"] == attack.result["pid"]
            assert look["found"] == [f"{leading}/granted"]  # the mount point is kept
        assert (victim / "precious.txt").read_text() == "host data"
    finally:
        pool.close()
        shutil.rmtree(host, ignore_errors=True)


def test_timers_a_call_left_never_run_in_the_next_call(pool: WarmRuntime, tmp_path: Path) -> None:
    snooped = tmp_path / "snooped"
    assert run(pool, "leave_timers", {"out": str(snooped)}).result == {"left": 4}
    nxt = run(pool, "sleep", {"ms": 900}, env={"API_KEY": "next-caller-key"})
    assert nxt.error is None
    time.sleep(0.3)
    assert not snooped.exists(), snooped.read_text()
    # timers still work within their own call, with that call's env
    own = run(pool, "timer_in_call", env={"API_KEY": "mine"})
    assert own.result == {"fired": "mine"}


def test_strict_isolation_gives_each_call_a_process_of_its_own(
    client: ToolClient, start_worker: StartWorker
) -> None:
    worker = start_worker(env={"TOOLQ_TOOLS__MODULE_COUNTER__ISOLATION": "strict"})
    queue = worker.argv[-1].split("=", 1)[1]
    strict = [client.run("module_counter", queue=queue, wait=60).result for _ in range(3)]
    assert [r["calls"] for r in strict] == [1, 1, 1]  # type: ignore[index]
    assert len({r["pid"] for r in strict}) == 3  # type: ignore[index]
    # other tools stay warm: six calls, at most four warm processes (the pool's size)
    shared = [client.run("pid", queue=queue, wait=60).result for _ in range(6)]
    assert len({r["pid"] for r in shared}) <= 4  # type: ignore[index]
