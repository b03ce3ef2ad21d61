"""Reliability (issue 11): poison messages, broker restarts, hung Redis, bounded dead letters.

Real Redis (the suite's database, or a private redis-server where a test stops or
freezes it), real worker processes, real Bun. Waits are generous bounds, never tight
wall-clock asserts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import TOOLS_CONFIG, StartWorker, wait_until
from tests.test_operations import toolq
from toolq import BrokerUnavailable, ResultTimeout, ToolClient
from toolq.cli.devredis import RedisServer
from toolq.config.celery_app import queue_lists
from toolq.config.loader import load_settings
from toolq.workers.deadletter import DeadLetters
from toolq.workers.process import WorkerProcess

# -- helpers -------------------------------------------------------------------------------

TEST_KEYS = load_settings(TOOLS_CONFIG, environ={}).keys
"""The test tool project's own keys (its name namespaces them)."""


def queue_of(worker: WorkerProcess) -> str:
    return next(arg.split("=", 1)[1] for arg in worker.argv if arg.startswith("--queues="))


def pop_waiting(connection: redis.Redis, queue: str) -> Any:
    """The oldest waiting message of a queue, whichever priority list holds it."""
    for name in queue_lists(queue):
        raw = connection.rpop(name)
        if raw is not None:
            return raw
    return None


def template_message(client: ToolClient, redis_url: str) -> dict[str, Any]:
    """A real run_tool message as kombu stores it, taken from a queue nobody consumes."""
    parking = f"parking-{uuid.uuid4().hex[:8]}"
    client.enqueue("echo", {"template": True}, queue=parking)
    with redis.Redis.from_url(redis_url) as connection:
        raw = pop_waiting(connection, parking)
        connection.delete(*queue_lists(parking), f"_kombu.binding.{parking}")
    assert raw is not None
    message: dict[str, Any] = json.loads(raw)
    return message


def encode_body(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def make_message(
    template: dict[str, Any], queue: str, *, call_id: str | None, marker: str
) -> dict[str, Any]:
    message = json.loads(json.dumps(template))
    message["headers"]["id"] = call_id
    message["headers"]["root_id"] = call_id
    message["headers"]["test_marker"] = marker
    message["properties"]["correlation_id"] = call_id
    message["properties"]["delivery_tag"] = str(uuid.uuid4())
    message["properties"]["delivery_info"] = {"exchange": queue, "routing_key": queue}
    return message


def poison_entries(redis_url: str, marker: str) -> list[dict[str, Any]]:
    with redis.Redis.from_url(redis_url) as connection:
        letters = DeadLetters(connection, 10_000, namespace=TEST_KEYS)
        return [
            entry
            for entry in letters.list()
            if entry.get("retry_stopped") == "poison" and marker in json.dumps(entry)
        ]


# -- 1. poison messages --------------------------------------------------------------------


def poison_cases(template: dict[str, Any]) -> dict[str, Any]:
    """name -> a function (message) -> the raw entry to push (str or dict)."""
    good_body = json.loads(base64.b64decode(template["body"]))
    request = good_body[0][0]

    def body(value: Any) -> Any:
        def mutate(message: dict[str, Any]) -> dict[str, Any]:
            message["body"] = encode_body(value)
            return message

        return mutate

    def headers(**changes: Any) -> Any:
        def mutate(message: dict[str, Any]) -> dict[str, Any]:
            for key, value in changes.items():
                if value is None:
                    message["headers"].pop(key, None)
                else:
                    message["headers"][key] = value
            return message

        return mutate

    def raw_text(message: dict[str, Any]) -> str:
        return f"not json at all {message['headers']['test_marker']}"

    def no_properties(message: dict[str, Any]) -> dict[str, Any]:
        del message["properties"]
        return message

    def bad_base64(message: dict[str, Any]) -> dict[str, Any]:
        message["body"] = "!!! not base64 ***"
        return message

    def pickle_content(message: dict[str, Any]) -> dict[str, Any]:
        message["content-type"] = "application/x-python-serialize"
        return message

    return {
        "body is a JSON object": body({"hello": "world"}),
        "body is a JSON string": body("just a string"),
        "args not a dict": body([[42], {}, good_body[2]]),
        "kwargs do not fit": body([[request], {"bogus": 1}, good_body[2]]),
        "no args": body([[], {}, good_body[2]]),
        "no id header": headers(id=None),
        "no task header": headers(task=None),
        "unknown task": headers(task="toolq.no_such_task"),
        "bad eta": headers(eta="yesterday-ish"),
        "bad timelimit": headers(timelimit="soon"),
        "body not base64": bad_base64,
        "not JSON": raw_text,
        "no properties": no_properties,
        "pickle content type": pickle_content,
    }


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_poison_messages_are_refused_recorded_answered_and_the_worker_goes_on(
    pool: str, client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    worker = start_worker(concurrency=2, pool=pool)
    queue = queue_of(worker)
    template = template_message(client, redis_url)
    marker = f"poison-test-{uuid.uuid4().hex[:8]}"
    ids: dict[str, str | None] = {}
    with redis.Redis.from_url(redis_url) as connection:
        for name, mutate in poison_cases(template).items():
            call_id = None if name == "no id header" else str(uuid.uuid4())
            message = make_message(template, queue, call_id=call_id, marker=f"{marker}:{name}")
            raw = mutate(message)
            ids[name] = (
                call_id if isinstance(raw, dict) and raw.get("headers", {}).get("id") else None
            )
            connection.lpush(queue, raw if isinstance(raw, str) else json.dumps(raw))
        # then a valid call on the same worker
        good = client.enqueue("echo", {"after": "poison"}, queue=queue)
        result = good.result(timeout=60)
        assert result.ok and result.result == {"echo": {"after": "poison"}}, result
        assert worker.proc is not None and worker.proc.poll() is None, worker.output()[-3000:]

        # every message with an id got a toolq failure envelope as its result
        for name, call_id in ids.items():
            if call_id is None:
                continue
            answer = client.call(call_id).result(timeout=30)
            assert answer.error is not None, name
            assert answer.error.kind == "invalid_input", (name, answer.error)
            assert answer.error.name == "PoisonMessage", name
            assert set(answer.to_dict()) == {
                "id",
                "tool_id",
                "status",
                "result",
                "error",
                "metadata",
            }
            assert answer.id == call_id

        # every one is in the dead-letter list, once, with its reason
        assert wait_until(lambda: len(poison_entries(redis_url, marker)) >= len(ids), 30)
        entries = poison_entries(redis_url, marker)
        assert len(entries) == len(ids), [e["poison"]["reason"] for e in entries]
        for entry in entries:
            assert entry["poison"]["reason"]
            assert entry["error"]["kind"] == "invalid_input"
        by_reason = " | ".join(e["poison"]["reason"] for e in entries)
        for expected in (
            "not Celery's [args, kwargs, embed]",
            "no 'id' header",
            "no 'task' header",
            "unknown task",
            "not valid base64",
            "not JSON",
            "is not a JSON object",
            "arguments do not fit",
            "eta",
        ):
            assert expected in by_reason, expected
        # nothing left behind: not queued again, not waiting unacknowledged
        assert connection.llen(queue) == 0
        unacked = [json.loads(v)[0] for v in connection.hvals("unacked")]
        assert not [m for m in unacked if marker in json.dumps(m)]
    assert worker.proc.poll() is None
    log = worker.output()
    assert log.count("poison message") >= len(ids)  # one line each, no traceback
    assert "Traceback" not in log and "Unrecoverable" not in log


def test_a_poison_message_reusing_a_finished_calls_id_does_not_rewrite_its_result(
    client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    worker = start_worker()
    queue = queue_of(worker)
    done = client.enqueue("echo", {"first": 1}, queue=queue)
    assert done.result(timeout=60).ok
    template = template_message(client, redis_url)
    message = make_message(template, queue, call_id=done.id, marker="reuse")
    message["body"] = encode_body({"not": "celery"})
    with redis.Redis.from_url(redis_url) as connection:
        connection.lpush(queue, json.dumps(message))
    assert client.run("echo", {"second": 2}, queue=queue, wait=60).ok  # the poison went first
    assert client.call(done.id).result(timeout=10).result == {"echo": {"first": 1}}


def test_a_worker_exits_non_zero_on_an_unrecoverable_error(start_worker: StartWorker) -> None:
    worker = start_worker()
    with redis.Redis.from_url(worker.redis_url) as connection:
        connection.delete(queue_of(worker))
        connection.set(queue_of(worker), "not a list")  # BRPOP: WRONGTYPE, not a connection error
    assert worker.proc is not None
    try:
        assert wait_until(lambda: worker.proc is not None and worker.proc.poll() is not None, 60)
        assert worker.proc.returncode not in (0, None), worker.output()[-2000:]
    finally:
        with redis.Redis.from_url(worker.redis_url) as connection:
            connection.delete(queue_of(worker))


# -- 2. broker restarts --------------------------------------------------------------------


@contextlib.contextmanager
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own (AOF on, fsync always): we may kill it."""
    server = RedisServer(persistent=True).start()
    try:
        yield server
    finally:
        server.close()


def kill_redis(server: RedisServer) -> None:
    assert server.proc is not None
    server.proc.kill()  # SIGKILL: no goodbye to the clients, only what the AOF holds
    server.proc.wait()


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_busy_worker_rides_out_a_redis_kill_and_restart(pool: str, tmp_path: Path) -> None:
    with private_redis() as server:
        settings = load_settings(TOOLS_CONFIG, environ={}, overrides={"redis_url": server.url})
        with (
            ToolClient(settings) as client,
            WorkerProcess(
                config=TOOLS_CONFIG, redis_url=server.url, concurrency=2, pool=pool
            ) as worker,
        ):
            worker.start(client.app)
            # one call running, one slot free: the case that killed workers (exit 0)
            counter = tmp_path / "long"
            running = client.enqueue("breaker_target", {"counter": str(counter), "ms": 4000})
            answers: list[Any] = []
            waiter = threading.Thread(
                target=lambda: answers.append(_result_or_error(running, 120)), daemon=True
            )
            waiter.start()
            assert wait_until(lambda: bool(lines(counter)), 30), worker.output()[-3000:]
            kill_redis(server)
            time.sleep(8)  # the call finishes while Redis is away
            server.start()
            waiter.join(150)
            assert answers, "the waiting caller never returned"
            result = answers[0]
            assert not isinstance(result, Exception), result
            assert result.ok, result
            assert result.result == {"runs": 1}
            assert worker.proc is not None and worker.proc.poll() is None, worker.output()[-4000:]
            # served after the restart, and the running call was acknowledged, not redone
            after = client.run("echo", {"after": "restart"}, wait=60)
            assert after.ok, after
            with redis.Redis.from_url(server.url) as connection:
                assert wait_until(lambda: connection.hlen("unacked") == 0, 30)
            assert len(lines(counter)) == 1  # ran once
            assert "Unrecoverable error" not in worker.output()


def test_a_caller_waits_out_an_outage_until_its_own_deadline() -> None:
    with private_redis() as server, fast_failing_client(server.url) as client:
        call = client.enqueue("echo", {"nobody": "consumes"})  # no worker: never answered
        kill_redis(server)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            call.result(timeout=4)
        assert time.monotonic() - started >= 3.5  # not at the first refused connection
        server.start()
        with pytest.raises(ResultTimeout):  # Redis back, still no result: a plain timeout
            call.result(timeout=1)


def test_workers_retry_storing_results_without_limit_producers_do_not(settings: Any) -> None:
    from toolq.config.celery_app import celery_config

    assert celery_config(settings, worker=True)["result_backend_max_retries"] == float("inf")
    assert celery_config(settings)["result_backend_max_retries"] < 10
    assert celery_config(settings)["result_backend_always_retry"] is True


def _result_or_error(call: Any, timeout: float) -> Any:
    try:
        return call.result(timeout=timeout)
    except Exception as exc:  # the test reports it
        return exc


# -- 3. producers fail fast ----------------------------------------------------------------

HUNG_TIMEOUT_S = 1.0
# One socket timeout, plus slack for a loaded 2-core machine: far below the old 30-60 s.
HUNG_BOUND_S = HUNG_TIMEOUT_S + 4.0


def fast_failing_client(url: str) -> ToolClient:
    settings = load_settings(
        TOOLS_CONFIG,
        environ={},
        overrides={"redis_url": url, "redis_socket_timeout": f"{HUNG_TIMEOUT_S:g}s"},
    )
    return ToolClient(settings)


def timed_enqueue(client: ToolClient) -> float:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.enqueue("echo", {"hung": True})
    return time.monotonic() - started


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A TCP port that accepts connections and never answers."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()


def test_enqueue_on_a_socket_that_never_answers_fails_fast() -> None:
    with black_hole() as url, fast_failing_client(url) as client:
        assert timed_enqueue(client) < HUNG_BOUND_S


def test_enqueue_on_a_stopped_redis_fails_fast_warm_or_cold() -> None:
    with private_redis() as server:
        assert server.proc is not None
        warm = fast_failing_client(server.url)
        warm.enqueue("echo", {"before": "stop"})  # connections open and pooled
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with fast_failing_client(server.url) as cold:
                assert timed_enqueue(warm) < HUNG_BOUND_S
                assert timed_enqueue(cold) < HUNG_BOUND_S
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        # and once Redis answers again, the same client works
        assert warm.enqueue("echo", {"after": "cont"}).id
        warm.close()


def _cli_enqueue(url: str, *options: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {
        **os.environ,
        "TOOLQ_REDIS_URL": url,
        "TOOLQ_CONFIG": str(TOOLS_CONFIG),
        "TOOLQ_REDIS_SOCKET_TIMEOUT": f"{HUNG_TIMEOUT_S:g}s",
    }
    argv = [sys.executable, "-m", "toolq", "enqueue", "echo", "--input", "{}", *options]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    return done, time.monotonic() - started


def test_cli_enqueue_on_a_hung_redis_exits_2_with_one_line(redis_url: str) -> None:
    """The hung Redis costs the command about its socket timeout, not 30-60 s: measured
    against the same command enqueueing to a Redis that answers (its start-up, which a
    loaded machine slows as much), not against a wall-clock bound."""
    with black_hole() as url:
        done, elapsed = _cli_enqueue(url)
    queue = f"q-{uuid.uuid4().hex[:8]}"  # (not the configured one: no worker takes it)
    answered, baseline = _cli_enqueue(redis_url, "--queue", queue)
    with redis.Redis.from_url(redis_url) as connection:
        connection.delete(*queue_lists(queue))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "cannot reach Redis" in done.stderr
    assert answered.returncode == 0, answered
    assert elapsed - baseline < HUNG_BOUND_S, (elapsed, baseline)


def test_socket_timeouts_do_not_break_an_idle_worker(
    client: ToolClient, start_worker: StartWorker
) -> None:
    """The worker's blocking BRPOP reads outlast the socket timeout: idle is not hung."""
    worker = start_worker(env={"TOOLQ_REDIS_SOCKET_TIMEOUT": "1s"})
    time.sleep(5)  # several socket timeouts with nothing to read
    result = client.run("echo", {"idle": "worker"}, queue=queue_of(worker), wait=60)
    assert result.ok, result
    assert "Connection to broker lost" not in worker.output()


# -- 4. bounded dead letters ---------------------------------------------------------------


@pytest.fixture
def scratch_redis() -> Iterator[RedisServer]:
    """An empty redis-server of the test's own: the dead-letter keys are global."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


def entry(call_id: str, input_bytes: int) -> dict[str, Any]:
    return {
        "id": call_id,
        "tool_id": "echo",
        "input": {"pad": "x" * input_bytes},
        "env": {"TOKEN": "secret"},
        "timeout": None,
        "queue": "toolq",
        "error": {"kind": "tool_error", "name": "Error", "message": "boom", "stack": None},
        "attempts": 1,
        "attempt_history": [],
        "retry_stopped": "max_attempts",
        "worker": "w",
    }


def stored_bytes(connection: redis.Redis) -> int:
    return sum(len(value) for value in connection.hvals("toolq:dlq:entries"))


def test_dead_letters_stay_within_their_byte_budget_oldest_first(
    scratch_redis: RedisServer,
) -> None:
    with redis.Redis.from_url(scratch_redis.url) as connection:
        letters = DeadLetters(connection, 10_000, max_bytes=64 * 1024, ttl_s=3600)
        for n in range(100):
            letters.add(entry(f"call-{n:03d}", 2000))
            assert letters.bytes_used() <= 64 * 1024
        kept = [e["id"] for e in letters.list()]
        assert 20 < len(kept) < 100  # evicted by bytes, not by count
        assert kept == [f"call-{n:03d}" for n in range(99, 99 - len(kept), -1)]  # newest kept
        assert letters.bytes_used() == stored_bytes(connection)
        assert all(e["input"] == {"pad": "x" * 2000} for e in letters.list())  # whole
        letters.remove(kept[0])
        assert letters.bytes_used() == stored_bytes(connection)


def test_an_entry_over_a_tenth_of_the_budget_keeps_a_preview_and_replay_refuses_it(
    scratch_redis: RedisServer,
) -> None:
    with redis.Redis.from_url(scratch_redis.url) as connection:
        letters = DeadLetters(
            connection, 10_000, max_bytes=64 * 1024, ttl_s=3600, namespace=TEST_KEYS
        )
        letters.add(entry("small", 1000))
        letters.add(entry("huge", 200_000))
        huge = letters.get("huge")
        assert huge is not None and huge["input_truncated"] is True
        assert huge["input_bytes"] > 200_000
        assert isinstance(huge["input"], str) and huge["input"].startswith('{"pad": "xxx')
        assert len(json.dumps(huge)) <= 64 * 1024 // 10
        small = letters.get("small")
        assert small is not None and small["input"] == {"pad": "x" * 1000}  # untouched
    env = {"TOOLQ_DEAD_LETTER_MAX_BYTES": "64KiB"}
    refused = toolq(scratch_redis.url, "dlq", "replay", "huge", env=env)
    assert refused.returncode == 1, refused
    assert "cannot replay huge" in refused.stderr and "too large" in refused.stderr
    assert "Traceback" not in refused.stderr
    replayed = toolq(scratch_redis.url, "dlq", "replay", "small", env=env)
    assert replayed.returncode == 0, replayed
    assert replayed.stdout.startswith("small -> ")
    with redis.Redis.from_url(scratch_redis.url) as connection:
        raw = pop_waiting(connection, "toolq")
        assert raw is not None
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        assert body[0][0]["input"] == {"pad": "x" * 1000}  # replayed whole
        assert connection.hexists(TEST_KEYS.dead_letters, "huge")  # refused: still there


def test_dead_letters_older_than_their_ttl_are_gone(scratch_redis: RedisServer) -> None:
    with redis.Redis.from_url(scratch_redis.url) as connection:
        letters = DeadLetters(connection, 10_000, max_bytes=64 * 1024, ttl_s=1.0)
        letters.add(entry("old", 100))
        assert [e["id"] for e in letters.list()] == ["old"]
        assert connection.pttl("toolq:dlq:entries") > 0  # the whole list expires too
        time.sleep(1.5)
        assert letters.get("old") is None
        letters.add(entry("new", 100))
        assert [e["id"] for e in letters.list()] == ["new"]
        assert letters.count() == 1
        assert letters.bytes_used() == stored_bytes(connection)


def test_dead_letter_settings_parse_sizes_and_durations() -> None:
    settings = load_settings(
        TOOLS_CONFIG,
        environ={},
        overrides={"dead_letter_max_bytes": "2MiB", "dead_letter_ttl": "36h"},
    )
    assert settings.dead_letter_max_bytes == 2 * 1024**2
    assert settings.dead_letter_ttl_s == 36 * 3600
    with pytest.raises(Exception, match="dead_letter_max_bytes"):
        load_settings(TOOLS_CONFIG, environ={}, overrides={"dead_letter_max_bytes": "lots"})
