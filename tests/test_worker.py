"""End to end: producer -> Redis -> a real Celery worker process -> Bun -> result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    TOOLS_CONFIG,
    StartWorker,
    check_a_closed_client_leaves_no_socket_open,
    descendants,
    process_alive,
    processes_running,
    unique_seconds,
    wait_until,
)
from tests.test_runner import max_overlap
from toolq import InvalidInput, ResultTimeout, ToolClient, ToolError, ToolResult
from toolq.config.celery_app import RUN_TOOL_TASK
from toolq.workers.process import WorkerProcess


def test_run_returns_a_well_formed_result(client: ToolClient, worker: WorkerProcess) -> None:
    result = client.run("echo", {"city": "Lisbon"}, wait=30)
    assert result.ok and result.status == "success"
    assert result.result == {"echo": {"city": "Lisbon"}}
    assert result.error is None
    meta = result.metadata
    assert meta["tool_exec_id"] == result.id
    assert isinstance(meta["execution_time"], int)
    assert meta["attempts"] == 1
    assert meta["worker"] == worker.hostname
    assert meta["queue_wait"] >= 0
    assert meta["sandbox"] == "bwrap"  # bubblewrap is installed by `make test`
    data = result.to_dict()
    assert set(data) == {"id", "tool_id", "status", "result", "error", "metadata"}
    assert ToolResult.from_dict(json.loads(json.dumps(data))) == result


@pytest.mark.parametrize(
    ("tool_id", "payload", "env", "check"),
    [
        ("returns_string", None, None, lambda r: r.result == {"value": "hello"}),
        ("returns_null", None, None, lambda r: r.result == {}),
        (
            "env",
            {"keys": ["GREETING"]},
            {"GREETING": "hi"},
            lambda r: r.result == {"env": {"GREETING": "hi"}},
        ),
        ("console", None, None, lambda r: r.result == {"ok": True}),
        ("stray_stdout", None, None, lambda r: r.result == {"ok": True}),
        ("no_such_tool", None, None, lambda r: r.error.kind == "not_found"),
        (
            "throws",
            None,
            None,
            lambda r: (
                (r.error.kind, r.error.name, r.error.message)
                == ("tool_error", "TypeError", "bad things happened")
            ),
        ),
    ],
)
def test_protocol_through_the_worker(
    client: ToolClient, worker: WorkerProcess, tool_id: str, payload: Any, env: Any, check: Any
) -> None:
    assert check(client.run(tool_id, payload, env=env, wait=30))


def test_raise_for_error_maps_kinds_to_exceptions(
    client: ToolClient, worker: WorkerProcess
) -> None:
    with pytest.raises(ToolError, match="bad things happened"):
        client.run("throws", wait=30).raise_for_error()


FAULTS = [
    ("sleep", {"ms": 10_000}, {"timeout"}),
    ("ignore_sigterm", {}, {"timeout"}),
    ("busy_loop", {}, {"timeout"}),
    ("fork_and_hang", {"seconds": "300"}, {"timeout"}),
    ("flood_stdout", {}, {"output_too_large"}),
    ("big_output", {"bytes": 11 * 1024 * 1024}, {"output_too_large"}),
    ("exit_code", {"code": 4}, {"crashed"}),
    ("segfault", {}, {"crashed"}),
    ("late_throw", {}, {"tool_error"}),
    ("returns_bigint", {}, {"invalid_output"}),
    ("memory_hog", {}, {"timeout", "crashed", "memory_exceeded"}),  # whichever limit is first
]


@pytest.mark.parametrize("mode", ["warm", "spawn"])
def test_every_fault_is_a_failed_result_and_the_worker_keeps_serving(
    client: ToolClient, start_worker: StartWorker, mode: str
) -> None:
    worker = start_worker(env={"TOOLQ_RUNTIME__MODE": mode})
    queue = _queue_of(worker)
    calls = [
        (client.enqueue(tool, payload, queue=queue), expected) for tool, payload, expected in FAULTS
    ]
    for call, expected in calls:
        result = call.result(timeout=60)
        assert not result.ok
        assert result.error is not None and result.error.kind in expected, (call.tool_id, result)
        assert result.error.message
    assert worker.proc is not None and worker.proc.poll() is None
    after = client.run("echo", {"after": "faults"}, queue=queue, wait=30)
    assert after.result == {"echo": {"after": "faults"}}


@pytest.mark.parametrize(
    ("request_body", "words"),
    [
        ({"tool_id": "../etc/passwd", "input": {}}, "invalid tool id"),
        ({"tool_id": "echo", "env": {"LD_PRELOAD": "/x.so"}}, "LD_PRELOAD"),
        ({"tool_id": "echo", "env": {"KEY": "a\nb"}}, "CR, LF or NUL"),
        ({"tool_id": "echo", "timeout": "1h"}, "longest configured hard limit"),
        ("not an object", "JSON object"),
    ],
)
def test_bad_requests_from_anywhere_are_invalid_input(
    client: ToolClient, worker: WorkerProcess, request_body: Any, words: str
) -> None:
    """Messages that bypass ToolClient's checks still end as envelopes, not crashes."""
    call_id = str(uuid.uuid4())
    client.app.send_task(RUN_TOOL_TASK, args=[request_body], task_id=call_id)
    result = client.call(call_id).result(timeout=30)
    assert result.error is not None and result.error.kind == "invalid_input"
    assert words in result.error.message


def test_client_refuses_bad_calls_before_enqueueing(client: ToolClient) -> None:
    with pytest.raises(InvalidInput, match="invalid tool id"):
        client.enqueue("/etc/passwd")
    with pytest.raises(InvalidInput, match="not allowed"):
        client.enqueue("echo", env={"NODE_OPTIONS": "--inspect"})
    with pytest.raises(InvalidInput, match="JSON"):
        client.enqueue("echo", {"when": object()})
    with pytest.raises(InvalidInput, match="over the limit"):
        client.enqueue("echo", {"data": "x" * (10 * 1024 * 1024 + 1)})


def test_oversized_input_near_the_cap_still_runs(client: ToolClient, worker: WorkerProcess) -> None:
    result = client.run("input_size", {"data": "x" * (4 * 1024 * 1024)}, wait=60)
    assert result.result == {"length": 4 * 1024 * 1024}


def test_per_call_timeout(client: ToolClient, worker: WorkerProcess) -> None:
    result = client.run("echo", {}, timeout="500ms", wait=30)
    assert result.ok
    slow = client.run("sleep", {"ms": 3000}, timeout=0.3, wait=30)
    assert slow.error is not None and slow.error.kind == "timeout"
    assert "300ms" in slow.error.message


def test_map_keeps_input_order(client: ToolClient, worker: WorkerProcess) -> None:
    inputs = [{"ms": ms} for ms in (300, 10, 200, 50, 0, 100)]
    results = client.map("sleep", inputs, wait=60)
    assert [r.result["slept"] for r in results] == [300, 10, 200, 50, 0, 100]  # type: ignore[index]


def test_a_closed_client_leaves_no_connection_open(settings: Any, worker: WorkerProcess) -> None:
    check_a_closed_client_leaves_no_socket_open(settings)


def test_waiting_too_briefly_raises_result_timeout(
    client: ToolClient, worker: WorkerProcess
) -> None:
    call = client.enqueue("sleep", {"ms": 2500}, timeout="3s")
    with pytest.raises(ResultTimeout):
        call.result(timeout=0.05)  # Celery checks the deadline about once a second
    assert call.result(timeout=30).ok  # the call itself went on


def test_worker_never_runs_more_than_max_concurrent_tools(
    client: ToolClient, start_worker: StartWorker
) -> None:
    worker = start_worker(env={"TOOLQ_PERFORMANCE__MAX_CONCURRENT_TOOLS": "2"})
    queue = _queue_of(worker)
    results = client.map("sleep", [{"ms": 400}] * 6, queue=queue, wait=60)
    windows = [(r.result["start"], r.result["end"]) for r in results]  # type: ignore[index]
    assert max_overlap(windows) == 2


@pytest.mark.parametrize("mode", ["warm", "spawn"])
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_killed_worker_leaves_no_bun_or_grandchildren(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path, pool: str, mode: str
) -> None:
    worker = start_worker(pool=pool, concurrency=1, env={"TOOLQ_RUNTIME__MODE": mode})
    queue = _queue_of(worker)
    marker, seconds = tmp_path / "running", unique_seconds()
    client.enqueue(
        "fork_and_hang", {"seconds": seconds, "marker": str(marker)}, timeout="5s", queue=queue
    )
    assert wait_until(lambda: marker.exists() and processes_running("sleep", seconds), 20)
    below = [pid for pid in descendants(worker.pid) if pid != worker.pid]
    assert below  # Bun (and bwrap, the reaper, the pool) are running under the worker
    worker.kill()  # SIGKILL: no cleanup code in the worker runs
    assert wait_until(lambda: not any(process_alive(pid) for pid in below), 10), (
        f"orphans left: {[pid for pid in below if process_alive(pid)]}"
    )
    assert not processes_running("sleep", seconds)


def test_slow_calls_are_logged_as_json(client: ToolClient, start_worker: StartWorker) -> None:
    worker = start_worker(
        env={
            "TOOLQ_PERFORMANCE__LOG_SLOW_QUERIES": "true",
            "TOOLQ_PERFORMANCE__SLOW_QUERY_THRESHOLD": "200ms",
        }
    )
    queue = _queue_of(worker)
    slow = client.run("sleep", {"ms": 400}, queue=queue, wait=30)
    fast = client.run("echo", {}, queue=queue, wait=30)
    assert slow.ok and fast.ok
    lines = [line for line in worker.output().splitlines() if "slow_tool_call" in line]
    assert len(lines) == 1, worker.output()[-3000:]
    record = json.loads(lines[0][lines[0].index("{") :])
    assert record["tool_id"] == "sleep" and record["tool_exec_id"] == slow.id
    assert record["duration_ms"] >= 400 and record["worker"] == worker.hostname
    assert record["attempt"] == 1


def _queue_of(worker: WorkerProcess) -> str:
    return next(arg.split("=", 1)[1] for arg in worker.argv if arg.startswith("--queues="))


# -- the command line ---------------------------------------------------------------------


def toolq(redis_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOOLQ_REDIS_URL": redis_url, "TOOLQ_CONFIG": str(TOOLS_CONFIG)}
    return subprocess.run(
        [sys.executable, "-m", "toolq", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=60,
    )


def test_cli_run_prints_the_envelope(redis_url: str, worker: WorkerProcess) -> None:
    proc = toolq(redis_url, "run", "env", "--input", '{"keys": ["A"]}', "--env", "A=1")
    assert proc.returncode == 0, proc.stderr
    envelope = json.loads(proc.stdout)
    assert envelope["status"] == "success"
    assert envelope["result"] == {"env": {"A": "1"}}
    assert set(envelope) == {"id", "tool_id", "status", "result", "error", "metadata"}


def test_cli_run_exit_codes(redis_url: str, worker: WorkerProcess) -> None:
    failed = toolq(redis_url, "run", "throws")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["kind"] == "tool_error"
    assert toolq(redis_url, "run", "echo", "--input", "{not json").returncode == 2
    assert toolq(redis_url, "run", "../escape").returncode == 2
    assert toolq(redis_url, "run", "echo", "--env", "NOEQUALS").returncode == 2
    stdin = toolq(redis_url, "run", "echo", "--input", "-", stdin='{"from": "stdin"}')
    assert json.loads(stdin.stdout)["result"] == {"echo": {"from": "stdin"}}


def test_cli_enqueue_then_result(redis_url: str, worker: WorkerProcess) -> None:
    enqueued = toolq(redis_url, "enqueue", "sleep", "--input", '{"ms": 300}')
    assert enqueued.returncode == 0
    call_id = enqueued.stdout.strip()
    uuid.UUID(call_id)
    done = toolq(redis_url, "result", call_id, "--wait", "--timeout", "30s")
    assert done.returncode == 0
    assert json.loads(done.stdout)["id"] == call_id
    again = toolq(redis_url, "result", call_id)
    assert again.returncode == 0


def test_cli_result_of_an_unknown_call_is_pending(redis_url: str, worker: WorkerProcess) -> None:
    proc = toolq(redis_url, "result", str(uuid.uuid4()))
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["status"] == "pending"


def test_cli_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = toolq("redis://127.0.0.1:1/0", "enqueue", "echo")
    assert proc.returncode == 2
    assert "cannot reach Redis" in proc.stderr
    assert time.monotonic() - started < 60
