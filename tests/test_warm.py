"""Warm mode's own promises: reuse, recycling, replacement ahead of need, what survives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.test_runner import TOOL_PERMISSIONS, make_runner, run
from toolq.config.settings import TimeLimits
from toolq.workers.runtime import warm as warm_module
from toolq.workers.runtime.base import Call
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmProcess, WarmRuntime


@pytest.fixture
def pool(bun: Path, request: pytest.FixtureRequest) -> Iterator[WarmRuntime]:
    options: dict[str, Any] = {"max_calls_per_process": 1000, "max_rss_mb": 512}
    options.update(getattr(request, "param", {}))
    warm = make_runner("warm", bun, 1, **options)
    assert isinstance(warm, WarmRuntime)
    yield warm
    warm.close()


def pid_of(pool: WarmRuntime | SpawnRuntime) -> str:
    """Which Bun process served the call (a random id each process draws at start)."""
    outcome = run(pool, "pid")
    assert outcome.result is not None
    return str(outcome.result["pid"])


def _counting_resets(monkeypatch: pytest.MonkeyPatch) -> list[WarmProcess]:
    resets: list[WarmProcess] = []
    real = WarmProcess.reset

    def reset(process: WarmProcess) -> bool:
        resets.append(process)
        return real(process)

    monkeypatch.setattr(WarmProcess, "reset", reset)
    return resets


def test_a_call_replies_before_its_process_is_reset(
    pool: WarmRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean-up between two calls is not on the caller's path: run() returns with the
    envelope read, and the reset happens when the worker settles (after the reply is
    stored), before the process serves anyone else."""
    # What nobody settles is reset in the background after 50 ms: on a loaded machine
    # this test could be descheduled that long between the call and its check.
    monkeypatch.setattr(warm_module, "SETTLE_GRACE_S", 60.0)
    resets = _counting_resets(monkeypatch)
    call = Call("pid", "exec-1", None, {}, TimeLimits(5, 6), permissions=TOOL_PERMISSIONS)
    first = pool.run(call)
    assert first.result is not None and resets == []
    pool.settle()
    assert len(resets) == 1 and pool._idle == resets  # reset, then back in the pool
    second = pool.run(call)
    assert second.result == first.result  # the same process, reset once in between
    pool.settle()
    assert len(resets) == 2


def test_a_process_nobody_settles_is_reset_in_the_background(
    pool: WarmRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    resets = _counting_resets(monkeypatch)
    call = Call("pid", "exec-1", None, {}, TimeLimits(5, 6), permissions=TOOL_PERMISSIONS)
    assert pool.run(call).result is not None
    assert wait_until(lambda: len(resets) == 1 and len(pool._idle) == 1, 5)


def test_one_process_serves_call_after_call(pool: WarmRuntime) -> None:
    assert len({pid_of(pool) for _ in range(5)}) == 1


def test_module_state_survives_between_calls_of_one_process(pool: WarmRuntime, bun: Path) -> None:
    counts = [run(pool, "module_counter").result["calls"] for _ in range(3)]  # type: ignore[index]
    assert counts == [1, 2, 3]
    spawn = make_runner("spawn", bun, 1)
    assert [run(spawn, "module_counter").result["calls"] for _ in range(2)] == [1, 1]  # type: ignore[index]
    spawn.close()


@pytest.mark.parametrize("pool", [{"max_calls_per_process": 3}], indirect=True)
def test_process_is_recycled_after_max_calls(pool: WarmRuntime) -> None:
    pids = [pid_of(pool) for _ in range(7)]
    assert pids[0] == pids[1] == pids[2] != pids[3]
    assert pids[3] == pids[4] == pids[5] != pids[6]


@pytest.mark.parametrize("pool", [{"max_rss_mb": 150}], indirect=True)
def test_process_is_recycled_when_its_memory_grows(pool: WarmRuntime) -> None:
    first = run(pool, "grow", {"mb": 40}).result
    assert first is not None and first["held_mb"] == 40  # under the limit: kept
    second = run(pool, "grow", {"mb": 200}).result
    assert second is not None and second["pid"] == first["pid"] and second["held_mb"] == 240
    third = run(pool, "grow", {"mb": 1}).result
    assert third is not None and third["pid"] != first["pid"] and third["held_mb"] == 1


@pytest.mark.parametrize(
    ("tool_id", "payload", "kind"),
    [
        ("exit_code", {"code": 3}, "crashed"),
        ("ignore_sigterm", {}, "timeout"),
        ("big_output", {"bytes": 11 * 1024 * 1024}, "output_too_large"),
        ("flood_stdout", {}, "output_too_large"),
        ("late_throw", {}, "tool_error"),
    ],
)
def test_a_broken_process_is_replaced_before_the_next_call(
    pool: WarmRuntime, tool_id: str, payload: Any, kind: str
) -> None:
    before = pid_of(pool)
    outcome = run(pool, tool_id, payload, timeout_s=0.5, hard_timeout_s=1.0)
    assert outcome.error is not None and outcome.error.kind == kind
    # the replacement is started in the background, ahead of the next call
    assert wait_until(lambda: len(pool._idle) == 1 and pool._idle[0].alive(), 10)
    waiting = pool._idle[0]
    after = pid_of(pool)
    assert pool._idle == [waiting]  # the next call was served by the process made ready
    if kind != "output_too_large" or tool_id == "flood_stdout":
        assert after != before


def test_env_of_one_call_never_reaches_the_next(pool: WarmRuntime) -> None:
    assert run(pool, "env", {"keys": ["SECRET"]}, env={"SECRET": "abc"}).result == {
        "env": {"SECRET": "abc"}
    }
    assert run(pool, "env", {"keys": ["SECRET"]}).result == {"env": {"SECRET": None}}
    keys = run(pool, "env_keys").result["keys"]  # type: ignore[index]
    compozy = {"COMPOZY_RUNTIME", "COMPOZY_PROJECT_ROOT"}
    assert set(keys) <= {"PATH", "HOME", "LANG", "TMPDIR", "PWD", *compozy}  # bwrap sets PWD
