"""Retries, circuit breakers, dead letters, redelivery, Redis restarts, idempotency.

All through real Redis and real worker processes. Delays are checked as ordering
and bounds against the policy, never as tight wall-clock values.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import TOOLS, TOOLS_CONFIG, StartWorker, wait_until
from toolq import ToolClient, ToolResult
from toolq.cli.devredis import RedisServer
from toolq.config.loader import load_settings
from toolq.workers.assembly import build_worker
from toolq.workers.call.attempt import Delivery, Final
from toolq.workers.call.guard import MAX_DELIVERIES
from toolq.workers.process import WorkerProcess

REDELIVERY_CONFIG = TOOLS / "redelivery.yaml"


def runs(counter: Path) -> list[float]:
    """Start times (s) of each run the tool recorded."""
    if not counter.exists():
        return []
    return [int(line) / 1000 for line in counter.read_text().split()]


def queue_of(worker: WorkerProcess) -> str:
    return next(arg.split("=", 1)[1] for arg in worker.argv if arg.startswith("--queues="))


def toolq(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOOLQ_REDIS_URL": redis_url, "TOOLQ_CONFIG": str(TOOLS_CONFIG)}
    return subprocess.run(
        [sys.executable, "-m", "toolq", *args], capture_output=True, text=True, env=env, timeout=60
    )


# -- retries -------------------------------------------------------------------------------


def test_flaky_tool_succeeds_on_its_third_try(
    client: ToolClient, worker: WorkerProcess, tmp_path: Path
) -> None:
    counter = tmp_path / "runs"
    result = client.run("flaky", {"counter": str(counter), "succeed_on": 3}, wait=60)
    assert result.ok, result
    assert result.result == {"runs": 3}
    meta = result.metadata
    assert meta["attempts"] == 3 == len(runs(counter))  # ran exactly as often as reported
    history = meta["attempt_history"]
    assert [h["kind"] for h in history] == ["tool_error", "tool_error"]
    assert [h["message"] for h in history] == ["flaky failure #1", "flaky failure #2"]
    # jitter off: initial 100ms, then x2 = 200ms (below the 300ms cap), exactly
    assert [h["delay"] for h in history] == [0.1, 0.2]
    starts = runs(counter)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # no attempt started before its delay was up
    assert all(gap < 5 for gap in gaps)  # and it did not wait for Redis' redelivery either


def test_always_failing_tool_stops_at_the_deadline_and_is_dead_lettered(
    client: ToolClient, worker: WorkerProcess, tmp_path: Path, redis_url: str
) -> None:
    counter = tmp_path / "runs"
    call = client.enqueue("always_fails", {"counter": str(counter)})
    result = call.result(timeout=60)
    meta = result.metadata
    assert result.error is not None and result.error.kind == "tool_error"
    assert meta["retry_stopped"] == "deadline"
    starts = runs(counter)
    assert meta["attempts"] == len(starts) == len(meta["attempt_history"]) + 1
    assert len(starts) >= 4
    delays = [h["delay"] for h in meta["attempt_history"]]
    assert all(0 < d <= 0.4 for d in delays)  # never past max_interval
    # jitter on: each delay within ±50 % of 50ms * 2^n (capped)
    for n, delay in enumerate(delays):
        base = min(0.05 * 2**n, 0.4)
        assert 0.5 * base - 1e-3 <= delay <= min(1.5 * base, 0.4) + 1e-3
    # no attempt was scheduled to start after the 2s deadline from the first enqueue
    assert starts[-1] <= meta["enqueued_at"] + 2.0 + 0.5

    listed = toolq(redis_url, "dlq", "list", "--json")
    entries = {e["id"]: e for e in json.loads(listed.stdout)}
    entry = entries[result.id]
    assert entry["input"] == {"counter": str(counter)}
    assert entry["attempts"] == meta["attempts"]
    assert entry["attempt_history"] == meta["attempt_history"]

    # piped (not a terminal): whole ids, tab-separated, so they can be fed back
    piped = toolq(redis_url, "dlq", "list").stdout.splitlines()
    assert piped[0].split("\t")[0] == "id"
    assert result.id in [line.split("\t")[0] for line in piped[1:]]

    replayed = toolq(redis_url, "dlq", "replay", result.id)
    assert replayed.returncode == 0, replayed.stderr
    old, new = replayed.stdout.strip().split(" -> ")
    assert old == result.id
    assert client.call(new).result(timeout=60).error is not None  # ran again, failed again
    assert len(runs(counter)) > len(starts)
    purged = toolq(redis_url, "dlq", "purge")
    assert purged.returncode == 0 and "purged" in purged.stdout
    assert json.loads(toolq(redis_url, "dlq", "list", "--json").stdout) == []


def test_errors_that_must_not_be_retried(
    client: ToolClient, worker: WorkerProcess, tmp_path: Path
) -> None:
    counter = tmp_path / "runs"
    opted_out = client.run("non_retryable", {"counter": str(counter)}, wait=30)
    assert opted_out.metadata["attempts"] == 1 == len(runs(counter))
    assert opted_out.metadata["retry_stopped"] == "not_retryable"
    missing = client.run("no_such_tool", max_attempts=5, wait=30)
    assert missing.metadata["attempts"] == 1
    assert missing.metadata["retry_stopped"] == "not_retryable"


def test_per_call_overrides(client: ToolClient, worker: WorkerProcess, tmp_path: Path) -> None:
    once = client.run("flaky", {"counter": str(tmp_path / "a")}, retry=False, wait=30)
    assert once.metadata["attempts"] == 1 and once.metadata["retry_stopped"] == "disabled"
    twice = client.run("flaky", {"counter": str(tmp_path / "b")}, max_attempts=2, wait=30)
    assert twice.metadata["attempts"] == 2 == len(runs(tmp_path / "b"))
    assert twice.metadata["retry_stopped"] == "max_attempts"


# -- circuit breakers ---------------------------------------------------------------------


def test_breaker_tripped_on_one_worker_is_honoured_by_another(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path, redis_url: str
) -> None:
    first, second = start_worker(), start_worker()
    counter = tmp_path / "runs"
    for _ in range(3):  # fail_max: 3, all on the first worker
        sent = time.monotonic()  # the last one trips the breaker after this
        failed = client.run(
            "breaker_target",
            {"counter": str(counter), "fail": True},
            queue=queue_of(first),
            retry=False,
            wait=30,
        )
        assert failed.error is not None and failed.error.kind == "tool_error"
    refused = client.run(
        "breaker_target", {"counter": str(counter)}, queue=queue_of(second), retry=False, wait=30
    )
    assert refused.error is not None and refused.error.kind == "circuit_open"
    assert refused.metadata["worker"] == second.hostname
    assert len(runs(counter)) == 3  # Bun never started for the refused call

    listed = json.loads(toolq(redis_url, "breakers", "--json").stdout)
    status = next(s for s in listed if s["tool_id"] == "breaker_target")
    assert status["state"] == "open"
    # it may probe again 2 s (reset_timeout) after the trip, so the command (a second or
    # more on a loaded machine) can see the wait only if it looked within those 2 s
    if time.monotonic() - sent < 2.0:
        assert status["reopens_in_s"] > 0
    assert toolq(redis_url, "breakers", "reset", "breaker_target").returncode == 0
    after = client.run(
        "breaker_target", {"counter": str(counter)}, queue=queue_of(second), retry=False, wait=30
    )
    assert after.ok


def test_half_open_lets_exactly_one_probe_through(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path, redis_url: str
) -> None:
    first, second = start_worker(), start_worker()
    trip = tmp_path / "trip"
    for _ in range(3):
        client.run(
            "breaker_target",
            {"counter": str(trip), "fail": True},
            queue=queue_of(first),
            retry=False,
            wait=30,
        )
    time.sleep(2.2)  # reset_timeout: 2s; the next call may probe
    counter, release = tmp_path / "runs", tmp_path / "release"
    calls = [
        client.enqueue(
            "breaker_target",
            {"counter": str(counter), "release": str(release)},
            timeout="8s",  # the most a call may ask for here: the probe's time alone
            queue=queue_of(worker),
            retry=False,
        )
        for worker in (first, second) * 4
    ]
    # The probe runs until released, so every other call comes while it is out (two
    # probes would leave only six calls to end); then it closes the breaker.
    wait_until(lambda: sum(call.ready() for call in calls) >= 7, 30)
    release.touch()
    results = [call.result(timeout=60) for call in calls]
    kinds = sorted(r.error.kind if r.error else "ok" for r in results)
    assert kinds == ["circuit_open"] * 7 + ["ok"]
    assert len(runs(counter)) == 1  # one trial call, across the whole cluster
    listed = json.loads(toolq(redis_url, "breakers", "--json").stdout)
    assert next(s for s in listed if s["tool_id"] == "breaker_target")["state"] == "closed"


def test_calls_with_retry_budget_wait_for_the_breaker_instead_of_failing(
    client: ToolClient, worker: WorkerProcess, tmp_path: Path, redis_url: str
) -> None:
    assert toolq(redis_url, "breakers", "reset", "breaker_target").returncode == 0
    for _ in range(3):
        client.run(
            "breaker_target",
            {"counter": str(tmp_path / "trip"), "fail": True},
            retry=False,
            wait=30,
        )
    counter = tmp_path / "runs"
    results = client.map("breaker_target", [{"counter": str(counter)}] * 3, wait=60)
    assert all(r.ok for r in results), results
    for result in results:
        assert result.metadata["attempts"] == 1  # deferring burned no attempt
        deferred = [h for h in result.metadata["attempt_history"] if h.get("deferred")]
        assert deferred and all(h["kind"] == "circuit_open" for h in deferred)
    assert len(runs(counter)) == 3


# -- breaker accounting: one verdict per call ----------------------------------------------


def breaker_status(redis_url: str, tool_id: str) -> dict[str, Any]:
    listed = json.loads(toolq(redis_url, "breakers", "--json").stdout)
    return next((s for s in listed if s["tool_id"] == tool_id), {"state": "none", "failures": 0})


def test_one_call_failing_every_attempt_leaves_the_breaker_closed(
    client: ToolClient, worker: WorkerProcess, tmp_path: Path, redis_url: str
) -> None:
    toolq(redis_url, "breakers", "reset", "health_once")
    counter = tmp_path / "runs"
    failed = client.run("health_once", {"counter": str(counter), "fail": True}, wait=60)
    assert failed.error is not None and failed.error.kind == "tool_error"
    assert failed.metadata["attempts"] == 4 == len(runs(counter))  # fail_max is 3
    status = breaker_status(redis_url, "health_once")
    assert status["state"] == "closed" and status["failures"] == 1
    assert client.run("health_once", {}, wait=30).ok  # nobody else is refused


def test_caller_shortened_timeouts_leave_the_breaker_closed_and_end_as_timeout(
    client: ToolClient, worker: WorkerProcess, redis_url: str
) -> None:
    toolq(redis_url, "breakers", "reset", "health_once")
    for _ in range(3):  # fail_max times over
        result = client.run("health_once", {"ms": 2000}, timeout="200ms", wait=60)
        assert result.error is not None and result.error.kind == "timeout", result
        assert result.metadata["attempts"] == 4
    assert breaker_status(redis_url, "health_once")["failures"] == 0
    assert client.run("health_once", {}, wait=30).ok


def test_distinct_failing_calls_open_it_and_a_call_ends_with_its_own_failure(
    client: ToolClient, worker: WorkerProcess, redis_url: str
) -> None:
    toolq(redis_url, "breakers", "reset", "health_once")
    calls = [client.enqueue("health_once", {"fail": True, "ms": 300}) for _ in range(3)]
    results = [call.result(timeout=60) for call in calls]
    assert breaker_status(redis_url, "health_once")["state"] == "open"
    # each ended with its own failure, not circuit_open from its siblings' verdicts
    assert {r.error.kind for r in results if r.error} == {"tool_error"}
    refused = client.run("health_once", {}, retry=False, wait=30)
    assert refused.error is not None and refused.error.kind == "circuit_open"
    toolq(redis_url, "breakers", "reset", "health_once")


def test_failure_rate_trips_once_the_window_has_its_minimum(
    client: ToolClient, worker: WorkerProcess, redis_url: str
) -> None:
    toolq(redis_url, "breakers", "reset", "health_rate")
    for fail in (True, False, True, False, True):  # 3 of 5 failed, under minimum_calls 6
        client.run("health_rate", {"fail": fail}, wait=30)
    status = breaker_status(redis_url, "health_rate")
    assert status["state"] == "closed" and status["window_failures"] == 3
    client.run("health_rate", {"fail": True}, wait=30)  # 4 of 6: over 50 %
    assert breaker_status(redis_url, "health_rate")["state"] == "open"
    refused = client.run("health_rate", {}, retry=False, wait=30)
    assert refused.error is not None and refused.error.kind == "circuit_open"
    toolq(redis_url, "breakers", "reset", "health_rate")


class BreakerScripts:
    """Counts the Lua scripts run on this Redis against a breaker's keys (``…:breaker:…``),
    from MONITOR: other scripts (queue pops, kombu's binding upkeep) do not count."""

    def __init__(self, url: str) -> None:
        self.count = 0
        self._marks: set[str] = set()
        self._connection = redis.Redis.from_url(url)
        self._monitor = self._connection.monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        with contextlib.suppress(redis.ConnectionError, OSError, ValueError):
            for entry in self._monitor.listen():
                command = entry["command"]
                if command.upper().startswith(("EVALSHA", "EVAL ")) and ":breaker:" in command:
                    self.count += 1
                elif command.startswith("ECHO breaker-scripts-mark-"):
                    self._marks.add(command.split()[1])

    def settled(self) -> int:
        """The count once every command run so far has been seen: MONITOR lists commands
        in the order Redis ran them, so once a marker sent now shows, all before it have."""
        marker = f"breaker-scripts-mark-{uuid.uuid4().hex}"
        self._connection.echo(marker)
        assert wait_until(lambda: marker in self._marks, 10), "MONITOR fell silent"
        return self.count

    def close(self) -> None:
        with contextlib.suppress(redis.ConnectionError, OSError):
            self._monitor.__exit__(None, None, None)
        self._connection.close()


def test_a_call_to_a_healthy_tool_costs_no_breaker_round_trip() -> None:
    """Admission and success are local while the breaker is closed and clean; a failure
    anywhere makes every worker ask Redis again, and the locally counted successes still
    land in the failure-rate window."""
    server = RedisServer().start()  # a Redis of its own: the command counts are this test's
    try:
        settings = load_settings(TOOLS_CONFIG, environ={}, overrides={"redis_url": server.url})
        scripts = BreakerScripts(server.url)
        with (
            ToolClient(settings) as client,
            WorkerProcess(config=TOOLS_CONFIG, redis_url=server.url) as worker,
        ):
            worker.start(client.app)
            # The worker learns the breaker is clean once its event subscription is up and a
            # verdict has told it; on a loaded machine that takes more than the first call.
            learning_ends = time.monotonic() + 30
            while True:
                before = scripts.settled()
                assert client.run("health_rate", {}, wait=30).ok
                if scripts.settled() == before:
                    break
                if time.monotonic() > learning_ends:
                    pytest.fail("the worker never admitted a call to a clean tool without Redis")
            before = scripts.settled()
            for _ in range(20):
                assert client.run("health_rate", {}, wait=30).ok
            assert scripts.settled() == before  # no breaker script per call
            assert client.run("health_rate", {"fail": True}, wait=30).error is not None
            assert wait_until(lambda: scripts.settled() > before, 5)
            for _ in range(3):  # no longer clean: every verdict goes to Redis
                assert client.run("health_rate", {}, wait=30).ok
            listed = json.loads(toolq(server.url, "breakers", "--json").stdout)
            status = next(s for s in listed if s["tool_id"] == "health_rate")
            # the successes counted locally came first: a full window of 10, one failure
            assert (status["window_calls"], status["window_failures"]) == (10, 1)
            assert status["state"] == "closed"
        scripts.close()
    finally:
        server.close()


def test_no_breaker_is_made_for_a_tool_that_does_not_exist(
    client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    guarded = start_worker(env={"TOOLQ_CIRCUIT_BREAKER__ENABLED": "true"})
    result = client.run("no_such_tool_at_all", {}, queue=queue_of(guarded), wait=30)
    assert result.error is not None and result.error.kind == "not_found"
    assert breaker_status(redis_url, "no_such_tool_at_all")["state"] == "none"
    assert not redis.Redis.from_url(redis_url).exists("toolq:breaker:no_such_tool_at_all")


# -- no lost calls -------------------------------------------------------------------------


def test_call_of_a_sigkilled_worker_completes_on_another(
    start_worker: StartWorker, tmp_path: Path, redis_url: str
) -> None:
    settings = load_settings(
        REDELIVERY_CONFIG, environ={}, overrides={"redis_url": redis_url, "queue": "redelivery"}
    )
    with ToolClient(settings) as client:
        doomed = start_worker(config=REDELIVERY_CONFIG, queues=["redelivery"], concurrency=1)
        marker = tmp_path / "marker"
        call = client.enqueue("marked_sleep", {"marker": str(marker), "ms": 1500})
        assert wait_until(marker.exists, 20)
        doomed.kill()
        survivor = start_worker(config=REDELIVERY_CONFIG, queues=["redelivery"], concurrency=1)
        result = call.result(timeout=90)
        assert result.ok, result
        assert result.metadata["worker"] == survivor.hostname
        assert client.call(call.id).result(timeout=5) == result  # one final result


def test_a_call_that_keeps_killing_its_worker_is_given_up(settings: Any) -> None:
    parts = build_worker(settings)
    request = {"tool_id": "echo", "input": {}, "env": {}, "enqueued_at": time.time()}
    try:
        first = parts.handler.handle(request, Delivery("poison-call", "w"))
        decisions = [first] + [
            parts.handler.handle(request, Delivery("poison-call", "w", redelivered=True))
            for _ in range(MAX_DELIVERIES)
        ]
    finally:
        parts.close()
    assert all(isinstance(d, Final) for d in decisions)
    assert all(d.envelope["status"] == "success" for d in decisions[:-1])  # type: ignore[union-attr]
    last = decisions[-1].envelope  # type: ignore[union-attr]
    assert last["error"]["kind"] == "crashed" and last["error"]["name"] == "WorkerLost"
    assert last["metadata"]["retry_stopped"] == "max_deliveries"


def test_redis_restart_under_load_loses_nothing(tmp_path: Path) -> None:
    server = RedisServer(persistent=True).start()
    try:
        settings = load_settings(TOOLS_CONFIG, environ={}, overrides={"redis_url": server.url})
        with (
            ToolClient(settings) as client,
            WorkerProcess(config=TOOLS_CONFIG, redis_url=server.url, concurrency=2) as worker,
        ):
            worker.start(client.app)
            calls = [client.enqueue("sleep", {"ms": 150}) for _ in range(20)]
            assert wait_until(lambda: calls[0].ready(), 30)
            server.stop()  # SIGTERM: Redis writes its AOF and exits, mid-load
            time.sleep(1.0)
            server.start()
            results: list[ToolResult] = [call.result(timeout=120) for call in calls]
            assert all(r.ok for r in results), [r.error for r in results if r.error]
            assert worker.proc is not None and worker.proc.poll() is None
            late = client.run("echo", {"after": "restart"}, wait=60)
            assert late.ok
    finally:
        server.close()


def test_idempotent_enqueue_runs_the_tool_once(
    client: ToolClient, worker: WorkerProcess, tmp_path: Path, redis_url: str
) -> None:
    counter = tmp_path / "runs"
    payload = {"counter": str(counter), "succeed_on": 1}
    first = client.enqueue("flaky", payload, idempotency_key="order-42")
    second = client.enqueue("flaky", payload, idempotency_key="order-42")
    assert first.id == second.id
    assert first.result(timeout=30) == second.result(timeout=30)
    third = toolq(
        redis_url, "run", "flaky", "--input", json.dumps(payload), "--idempotency-key", "order-42"
    )
    assert json.loads(third.stdout)["id"] == first.id
    other = client.enqueue("flaky", payload, idempotency_key="order-43")
    assert other.id != first.id and other.result(timeout=30).ok
    assert len(runs(counter)) == 2
    with redis.Redis.from_url(redis_url) as connection:
        assert connection.ttl("toolq:toolq-test-tools:idem:order-42") > 0  # the project's


def test_concurrent_idempotent_enqueues_agree(
    client: ToolClient, worker: WorkerProcess, tmp_path: Path
) -> None:
    counter = tmp_path / "runs"
    ids: list[str] = []
    lock = threading.Lock()

    def enqueue() -> None:
        call = client.enqueue(
            "flaky", {"counter": str(counter), "succeed_on": 1}, idempotency_key="race"
        )
        with lock:
            ids.append(call.id)

    threads = [threading.Thread(target=enqueue) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    assert client.call(ids[0]).result(timeout=30).ok
    assert len(runs(counter)) == 1
