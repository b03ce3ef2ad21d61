"""The Bun runner on its own: protocol and faults, with real Bun processes."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOOLS, processes_running, unique_seconds, wait_until
from toolq.config.settings import TimeLimits
from toolq.workers.runtime.base import DEFAULT_RESOURCES, Call, CancelToken, Outcome
from toolq.workers.runtime.bun import WRAPPER
from toolq.workers.runtime.launch import TMP_PREFIX, Launcher
from toolq.workers.runtime.limits import Cgroups
from toolq.workers.runtime.pump import MAX_OUTPUT_BYTES, MAX_STDERR_KEPT
from toolq.workers.runtime.routing import ByMode
from toolq.workers.runtime.sandbox import Permissions, make_sandbox
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime

Runner = SpawnRuntime | WarmRuntime


TOOL_PERMISSIONS = Permissions.parse(["--allow-read", "--allow-write", "--allow-run"])
"""The test tools read and write files under tests/tools/.tmp (pytest's basetemp)."""


def make_launcher(bun: Path, sandboxed: bool = True) -> Launcher:
    """What a worker builds: sandboxed and in cgroups wherever this machine allows."""
    return Launcher(
        bun,
        TOOLS / "entrypoint.ts",
        TOOLS,
        sandbox=make_sandbox("auto" if sandboxed else "off", bun, WRAPPER, TOOLS),
        cgroups=Cgroups.detect(),
    )


def make_runner(
    mode: str, bun: Path, size: int = 4, sandboxed: bool = True, **options: Any
) -> Runner:
    """``spawn``: processes started ahead of demand (the default); ``spawn-cold``: none."""
    launcher = make_launcher(bun, sandboxed)
    if mode in ("spawn", "spawn-cold"):
        spawn = SpawnRuntime(launcher, ahead=2 if mode == "spawn" else 0)
        spawn.start([(TOOL_PERMISSIONS, DEFAULT_RESOURCES)])
        return spawn
    options = {"max_calls_per_process": 1000, "max_rss_mb": 512, **options}
    pool = WarmRuntime(launcher, size, permissions=TOOL_PERMISSIONS, **options)
    pool.start()
    return pool


@pytest.fixture(scope="module", params=["spawn", "spawn-cold", "warm"])
def runner(request: pytest.FixtureRequest, bun: Path) -> Iterator[Runner]:
    """Every protocol and fault test runs against both runtime modes (spawn with and
    without processes started ahead of demand)."""
    built = make_runner(request.param, bun)
    yield built
    built.close()


def run(
    runner: Runner | ByMode,
    tool_id: str,
    payload: Any = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 5.0,
    hard_timeout_s: float | None = None,
) -> Outcome:
    limits = TimeLimits(timeout_s, hard_timeout_s or timeout_s + 1)
    outcome = runner.run(
        Call(tool_id, "exec-1", payload, env or {}, limits, permissions=TOOL_PERMISSIONS)
    )
    if isinstance(runner, (WarmRuntime, SpawnRuntime, ByMode)):
        runner.settle()  # as the worker does once the reply is stored
    return outcome


def _mode_of(runner: Runner) -> str:
    if isinstance(runner, WarmRuntime):
        return "warm"
    return "spawn" if runner.ahead else "spawn-cold"


def kind(outcome: Outcome) -> str | None:
    return outcome.error.kind if outcome.error else None


# -- protocol -----------------------------------------------------------------------------


def test_success_round_trips_input(runner: Runner) -> None:
    payload = {"text": "héllo ✓", "n": [1, 2.5, None, True], "nested": {"a": {}}}
    outcome = run(runner, "echo", payload)
    assert outcome.error is None
    assert outcome.result == {"echo": payload}
    assert outcome.execution_time_ms >= 0


def test_config_reaches_the_tool_as_second_argument(runner: Runner) -> None:
    call = Call("with_config", "e", None, {}, TimeLimits(5, 6), config={"units": "metric"})
    assert runner.run(call).result == {"config": {"units": "metric"}}


@pytest.mark.parametrize(
    ("tool_id", "expected"),
    [
        ("returns_string", {"value": "hello"}),
        ("returns_number", {"value": 42}),
        ("returns_array", {"value": [1, 2, 3]}),
        ("returns_null", {}),
        ("returns_undefined", {}),
    ],
)
def test_result_normalisation(runner: Runner, tool_id: str, expected: Any) -> None:
    assert run(runner, tool_id).result == expected


def test_unknown_tool_is_not_found_and_lists_tools(runner: Runner) -> None:
    outcome = run(runner, "no_such_tool")
    assert kind(outcome) == "not_found"
    assert outcome.error is not None
    assert outcome.error.message.startswith(
        "Tool no_such_tool not found in entrypoint exports. Available tools: "
    )
    assert "echo" in outcome.error.message


def test_env_is_minimal_plus_the_call_env(
    runner: Runner, bun: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_SECRET", "must-not-leak")
    leaky = make_runner(_mode_of(runner), bun, 1)
    outcome = run(leaky, "env_keys", env={"API_TOKEN": "abc123"})
    keys = set(outcome.result["keys"])  # type: ignore[index]
    assert "WORKER_SECRET" not in keys
    assert {"PATH", "HOME", "TMPDIR", "LANG", "API_TOKEN"} <= keys
    compozy = {"COMPOZY_RUNTIME", "COMPOZY_PROJECT_ROOT"}  # Compozy gives every tool these
    assert keys <= {"PATH", "HOME", "TMPDIR", "LANG", "API_TOKEN", "PWD", *compozy}  # bwrap: PWD
    values = run(leaky, "env", {"keys": ["API_TOKEN", "TMPDIR"]}, env={"API_TOKEN": "abc123"})
    env = values.result["env"]  # type: ignore[index]
    assert env["API_TOKEN"] == "abc123" and env["TMPDIR"]
    after = run(leaky, "env", {"keys": ["API_TOKEN"]})  # the same warm process, or a new one
    assert after.result == {"env": {"API_TOKEN": None}}  # the call's env did not stay
    leaky.close()


def test_each_call_starts_with_an_empty_private_tmpdir(runner: Runner) -> None:
    wrote = run(runner, "tmp_write").result
    listed = run(runner, "tmp_list").result
    assert wrote is not None and listed is not None
    assert listed["entries"] == []  # nothing a call left survives it


def ours() -> set[str]:
    """This process's unsandboxed Bun processes' host TMPDIRs: one per live process."""
    return {str(p) for p in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}{os.getpid()}-*")}


@pytest.mark.parametrize("mode", ["spawn", "spawn-cold", "warm"])
def test_an_unsandboxed_process_has_a_host_tmpdir_that_goes_with_it(bun: Path, mode: str) -> None:
    """Without a sandbox (no tmpfs of its own), each Bun process gets a private host
    TMPDIR, removed with the process: after a spawned call, and at the latest at close."""
    before = ours()
    runner = make_runner(mode, bun, size=1, sandboxed=False)
    try:
        first = run(runner, "tmp_write").result
        second = run(runner, "tmp_list").result
        assert first is not None and second is not None
        assert Path(first["dir"]).name.startswith(f"{TMP_PREFIX}{os.getpid()}-")
        assert first["dir"] not in before
        if mode == "warm":  # the same process: its TMPDIR stays, emptied between calls
            assert second == {"dir": first["dir"], "entries": []}
        else:  # a process per call: the first call's TMPDIR went with its process
            assert second["dir"] != first["dir"]
            assert wait_until(lambda: first["dir"] not in ours())
    finally:
        runner.close()
    assert ours() == before


def test_close_waits_for_a_process_being_started_ahead(
    bun: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call takes a process started ahead and a replacement starts at once: closing
    right then must not leave that replacement behind (it did under load: close()
    returned while it was still starting, and it was killed later, if ever)."""
    before = ours()
    runner = make_runner("spawn", bun, sandboxed=False)
    assert isinstance(runner, SpawnRuntime)
    assert wait_until(lambda: len(runner.ready((TOOL_PERMISSIONS, DEFAULT_RESOURCES))) == 2, 30)
    launch = runner.launcher.launch

    def slow_launch(**options: Any) -> Any:
        launched = launch(**options)
        time.sleep(0.3)  # started, not yet ready: as under load
        return launched

    monkeypatch.setattr(runner.launcher, "launch", slow_launch)
    try:
        assert run(runner, "echo", {"n": 1}).error is None
    finally:
        runner.close()
    assert ours() == before


def test_a_warm_process_busy_when_its_pool_closes_goes_when_its_call_ends(
    bun: Path, tmp_path: Path
) -> None:
    before = ours()
    runner = make_runner("warm", bun, size=1, sandboxed=False)
    marker, outcomes = tmp_path / "marker", []
    call = threading.Thread(
        target=lambda: outcomes.append(
            run(runner, "marked_sleep", {"marker": str(marker), "ms": 500})
        )
    )
    call.start()
    try:
        assert wait_until(marker.exists, 30)
    finally:
        runner.close()
        call.join()
    assert outcomes[0].error is None  # the call ran to its end
    assert ours() == before  # and its process went after it


def test_console_goes_to_stderr_with_levels(runner: Runner) -> None:
    outcome = run(runner, "console")
    assert outcome.result == {"ok": True}
    for line in ("[LOG] log line", "[INFO] info line", "[WARN] warn line", "[ERROR] error line"):
        assert line in outcome.stderr


def test_stray_stdout_cannot_corrupt_the_result(runner: Runner) -> None:
    outcome = run(runner, "stray_stdout")
    assert outcome.error is None
    assert outcome.result == {"ok": True}
    assert "forged" in outcome.stderr  # kept as log output


def test_thrown_errors_keep_name_message_stack(runner: Runner) -> None:
    outcome = run(runner, "throws")
    assert outcome.error is not None
    assert (outcome.error.kind, outcome.error.name, outcome.error.message) == (
        "tool_error",
        "TypeError",
        "bad things happened",
    )
    assert "entrypoint.ts" in (outcome.error.stack or "")
    thrown_string = run(runner, "throws_string").error
    assert thrown_string is not None and thrown_string.message == "just a string"


def test_error_thrown_from_a_timer_is_a_tool_error(runner: Runner) -> None:
    outcome = run(runner, "late_throw")
    assert kind(outcome) == "tool_error"
    assert outcome.error is not None and outcome.error.message == "thrown from a timer"


def test_unserialisable_result_is_invalid_output(runner: Runner) -> None:
    assert kind(run(runner, "returns_bigint")) == "invalid_output"


def test_input_that_is_not_json_is_invalid_input(runner: Runner) -> None:
    assert kind(run(runner, "echo", {"f": float("nan")})) == "invalid_input"
    assert kind(run(runner, "echo", {"s": {1, 2}})) == "invalid_input"


# -- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(("code",), [(3,), (1,)])
def test_exit_code_is_a_crash_with_the_code(runner: Runner, code: int) -> None:
    outcome = run(runner, "exit_code", {"code": code})
    assert kind(outcome) == "crashed"
    assert outcome.error is not None and f"code {code}" in outcome.error.message


def test_exit_zero_without_result_is_a_crash(runner: Runner) -> None:
    assert kind(run(runner, "exit_zero")) == "crashed"


def test_signal_is_a_crash_naming_the_signal(runner: Runner) -> None:
    outcome = run(runner, "segfault")
    assert kind(outcome) == "crashed"
    assert outcome.error is not None and "SIGSEGV" in outcome.error.message


def test_crash_stderr_is_kept_and_secrets_redacted(runner: Runner) -> None:
    outcome = run(runner, "print_secret", env={"API_TOKEN": "s3cr3t-value"})
    assert kind(outcome) == "crashed"
    assert outcome.error is not None and outcome.error.stderr is not None
    assert "the secret is ***" in outcome.error.stderr
    assert "s3cr3t-value" not in outcome.stderr + json.dumps(outcome.error.to_dict())


def test_soft_timeout_sends_sigterm_to_the_group(runner: Runner, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    outcome = run(
        runner, "graceful_sigterm", {"marker": str(marker)}, timeout_s=0.5, hard_timeout_s=5
    )
    assert kind(outcome) == "timeout"
    assert marker.read_text() == "cleaned up"  # the tool got SIGTERM and cleaned up
    assert outcome.error is not None and "SIGTERM" in outcome.error.message


def test_hard_timeout_kills_a_tool_that_ignores_sigterm(runner: Runner, tmp_path: Path) -> None:
    log = tmp_path / "log"
    started = time.monotonic()
    outcome = run(
        runner, "ignore_sigterm", {"pidfile": str(log)}, timeout_s=0.5, hard_timeout_s=1.5
    )
    assert kind(outcome) == "timeout"
    assert "sigterm" in log.read_text()
    assert outcome.error is not None and "SIGKILL" in outcome.error.message
    assert time.monotonic() - started < 10  # ended by the runner, not by the tool


def test_busy_loop_is_stopped(runner: Runner) -> None:
    assert kind(run(runner, "busy_loop", timeout_s=0.5, hard_timeout_s=1)) == "timeout"


def test_lingering_handles_do_not_hold_the_call(runner: Runner) -> None:
    started = time.monotonic()
    outcome = run(runner, "lingering", timeout_s=5)
    assert outcome.result == {"done": True}
    assert time.monotonic() - started < 4  # not held until the 5 s limit


@pytest.mark.parametrize("detach", [False, True])
def test_children_die_with_the_call(runner: Runner, detach: bool) -> None:
    seconds = unique_seconds()
    outcome = run(runner, "fork_child", {"seconds": seconds, "detach": detach})
    assert outcome.error is None
    assert wait_until(lambda: not processes_running("sleep", seconds), 5)


def test_children_of_a_timed_out_tool_die(runner: Runner, tmp_path: Path) -> None:
    seconds = unique_seconds()
    outcome = run(runner, "fork_and_hang", {"seconds": seconds}, timeout_s=0.5, hard_timeout_s=1)
    assert kind(outcome) == "timeout"
    assert wait_until(lambda: not processes_running("sleep", seconds), 5)


def test_stdout_flood_is_stopped_at_the_cap(runner: Runner) -> None:
    started = time.monotonic()
    outcome = run(runner, "flood_stdout", timeout_s=30)
    assert kind(outcome) == "output_too_large"
    assert time.monotonic() - started < 20  # stopped at the cap, not at the timeout
    assert len(outcome.stderr.encode()) <= MAX_STDERR_KEPT + 200


def test_stderr_flood_keeps_the_last_mebibyte(runner: Runner) -> None:
    outcome = run(runner, "flood_stderr_then_return", {"mb": 3})
    assert outcome.result == {"ok": True}
    assert "bytes of stderr dropped" in outcome.stderr
    assert len(outcome.stderr.encode()) <= MAX_STDERR_KEPT + 200


def test_oversized_output_is_refused(runner: Runner) -> None:
    assert kind(run(runner, "big_output", {"bytes": MAX_OUTPUT_BYTES + 1})) == "output_too_large"
    fits = run(runner, "big_output", {"bytes": 1024 * 1024})
    assert fits.error is None and len(fits.result["data"]) == 1024 * 1024  # type: ignore[index]


def test_large_input_reaches_the_tool_whole(runner: Runner) -> None:
    # Oversized input is refused by the call contract before any runtime sees it
    # (tests/fast/test_protocol.py, tests/test_worker.py).
    big = run(runner, "input_size", {"data": "x" * (2 * 1024 * 1024)})
    assert big.result == {"length": 2 * 1024 * 1024}


@pytest.mark.parametrize("mode", ["spawn", "spawn-cold", "warm"])
def test_concurrent_calls_are_capped(bun: Path, mode: str) -> None:
    # The worker's cap lives in front of the runtimes (ByMode): warm and spawn calls
    # together never exceed it; here a warm pool larger than the cap proves it is not
    # the pool's size that bounds them.
    runtime = make_runner(mode, bun, size=3)
    capped = ByMode({"spawn": runtime, "warm": runtime}, slots=2)
    windows: list[tuple[float, float]] = []

    def one() -> None:
        outcome = run(capped, "sleep", {"ms": 300})
        assert outcome.result is not None
        windows.append((outcome.result["start"], outcome.result["end"]))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    capped.close()
    assert len(windows) == 6
    assert max_overlap(windows) == 2


def max_overlap(windows: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_runner_survives_every_fault(runner: Runner) -> None:
    """Runs last: after every fault above, the same runner (and warm pool) still serves."""
    assert run(runner, "echo", {"still": "serving"}).result == {"echo": {"still": "serving"}}


# -- cancel (toolq cancel: the runtime seam) ------------------------------------------------


def run_cancelled(runner: Runner, tool_id: str, payload: Any, after_s: float) -> Outcome:
    """Run with a cancel token that is set ``after_s`` into the call."""
    token = CancelToken()
    limits = TimeLimits(6.0, 7.5)  # grace 1.5 s; far from the soft limit
    call = Call(tool_id, "exec-1", payload, {}, limits, permissions=TOOL_PERMISSIONS, cancel=token)
    timer = threading.Timer(after_s, token.cancel)
    timer.start()
    try:
        return runner.run(call)
    finally:
        timer.cancel()
        token.close()


def test_cancel_sends_sigterm_then_sigkill_after_the_grace(runner: Runner, tmp_path: Path) -> None:
    log = tmp_path / "log"
    started = time.monotonic()
    outcome = run_cancelled(runner, "ignore_sigterm", {"pidfile": str(log)}, 0.5)
    elapsed = time.monotonic() - started
    assert kind(outcome) == "cancelled"
    assert "sigterm" in log.read_text()  # asked first
    assert 0.5 + 1.5 - 0.1 <= elapsed < 6.0  # killed after the grace, before the soft limit


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_cancel_ends_a_tool_that_obeys_sigterm_at_once(
    bun: Path, tmp_path: Path, mode: str
) -> None:
    # A runtime of its own: a SIGTERM listener an earlier call registered in a shared warm
    # process would survive (module state) and exit first.
    runner = make_runner(mode, bun, 1)
    try:
        marker = tmp_path / "marker"
        started = time.monotonic()
        outcome = run_cancelled(runner, "graceful_sigterm", {"marker": str(marker)}, 0.3)
        assert kind(outcome) == "cancelled"
        assert marker.read_text() == "cleaned up"
        assert time.monotonic() - started < 0.3 + 1.4  # did not wait for the grace
        assert run(runner, "echo", {"after": "cancel"}).result == {"echo": {"after": "cancel"}}
    finally:
        runner.close()
