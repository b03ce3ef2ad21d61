"""Chunks (``ToolClient.map`` / ``enqueue_many`` / ``toolq run --batch``): many calls per
Celery message, each keeping its own id, result, retries and dead letter — with real
workers, Redis and Bun."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import redis

from tests.conftest import StartWorker, wait_until
from tests.test_operations import toolq
from tests.test_resilience import REDELIVERY_CONFIG
from tests.test_runner import max_overlap
from toolq import ToolClient
from toolq.config.celery_app import RUN_BATCH_TASK, queue_lists
from toolq.config.loader import load_settings
from toolq.envelope import ToolResult
from toolq.workers.process import WorkerProcess


def _queue_of(worker: WorkerProcess) -> str:
    return next(arg.split("=", 1)[1] for arg in worker.argv if arg.startswith("--queues="))


def _chunk_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    return [json.loads(e) for name in queue_lists(queue) for e in client.lrange(name, 0, -1)]


def test_map_in_chunks_gives_every_call_its_own_id_and_result(
    client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"  # queued first, to see the messages
    calls = client.enqueue_many("echo", [{"n": n} for n in range(250)], queue=queue, chunk_size=100)
    messages = _chunk_messages(redis_url, queue)
    assert [m["headers"]["task"] for m in messages] == [RUN_BATCH_TASK] * 3  # 100+100+50
    start_worker(concurrency=4, queues=[queue])
    results = client.gather(calls, wait=60)
    assert [r.result for r in results] == [{"echo": {"n": n}} for n in range(250)]
    assert len({call.id for call in calls}) == 250
    assert all(
        r.id == call.id == r.metadata["tool_exec_id"]
        for r, call in zip(results, calls, strict=True)
    )
    # each result is stored under its call's id, as a single call's is
    assert client.call(calls[123].id).result(timeout=5) == results[123]


def test_chunk_results_expire_as_single_call_results_do(
    client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    """The chunk writer stores results itself (one script per batch): the same key, the
    same expiry as Celery's backend gives a single call's result, success or failure."""
    queue = _queue_of(start_worker())
    connection = redis.Redis.from_url(redis_url)
    backend: Any = client.app.backend

    def ttl(call_id: str) -> int:
        return int(connection.ttl(backend.get_key_for_task(call_id)))

    for tool_id in ("echo", "throws_non_retryable"):
        single = client.enqueue(tool_id, {}, queue=queue)
        single.result(timeout=30)
        chunked = client.enqueue_many(tool_id, [{}, {}], queue=queue, chunk_size=2)
        client.gather(chunked, wait=30)
        expected = ttl(single.id)
        assert expected > 0
        assert all(abs(ttl(call.id) - expected) <= 5 for call in chunked), tool_id


def test_chunk_results_are_stored_after_redis_forgets_the_writer_script(
    client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    """A restarted Redis has no scripts: the writer loads its script again (as every
    toolq script does) instead of failing every chunk's results."""
    queue = _queue_of(start_worker())
    assert all(r.ok for r in client.map("echo", [{}] * 3, queue=queue, chunk_size=3, wait=30))
    redis.Redis.from_url(redis_url).script_flush()
    after = client.map("echo", [{"n": n} for n in range(3)], queue=queue, chunk_size=3, wait=30)
    assert [r.result for r in after] == [{"echo": {"n": n}} for n in range(3)]


def test_a_chunk_spreads_over_the_free_slots_and_no_more(
    client: ToolClient, start_worker: StartWorker
) -> None:
    worker = start_worker(env={"TOOLQ_PERFORMANCE__MAX_CONCURRENT_TOOLS": "3"})
    results = client.map("sleep", [{"ms": 400}] * 9, queue=_queue_of(worker), chunk_size=9)
    windows = [(r.result["start"], r.result["end"]) for r in results]  # type: ignore[index]
    assert max_overlap(windows) == 3  # one chunk, three slots: not one, not more


def test_a_single_call_is_not_starved_by_a_long_chunk(
    client: ToolClient, start_worker: StartWorker
) -> None:
    worker = start_worker(env={"TOOLQ_PERFORMANCE__MAX_CONCURRENT_TOOLS": "2"})
    queue = _queue_of(worker)
    chunk = client.enqueue_many("sleep", [{"ms": 300}] * 20, queue=queue, chunk_size=20)
    assert wait_until(lambda: chunk[0].ready(), 30)
    alone = client.run("echo", {"alone": True}, queue=queue, wait=60)
    done = [c for c in chunk if c.ready()]
    assert alone.ok
    # it waited for one of the chunk's calls at most, not for the whole chunk (6 s)
    assert len(done) < 20
    assert all(r.ok for r in client.gather(chunk, wait=60))


def test_failures_in_a_chunk_are_each_calls_own(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path, redis_url: str
) -> None:
    worker = start_worker(concurrency=2)
    queue = _queue_of(worker)
    counter = tmp_path / "flaky"
    calls = client.enqueue_many("echo", [{"ok": 1}, {"ok": 2}], queue=queue, chunk_size=2)
    # Mixed tools in one chunk: only producers other than map() send those; the worker
    # treats every call on its own anyway.
    results = client.gather(calls, wait=30)
    assert all(r.ok for r in results)

    inputs = [{"counter": str(counter), "succeed_on": 2}]
    flaky = client.enqueue_many("flaky", inputs * 1, queue=queue, chunk_size=1)
    throwing = client.enqueue_many("throws", [{}] * 3, queue=queue, chunk_size=3)
    flaky_result = client.gather(flaky, wait=60)[0]
    assert flaky_result.ok and flaky_result.metadata["attempts"] == 2
    failed = client.gather(throwing, wait=60)
    assert [r.error.kind for r in failed if r.error] == ["tool_error"] * 3
    dead = toolq(redis_url, "dlq", "list", "--json")
    dead_ids = {entry["id"] for entry in json.loads(dead.stdout)}
    assert {call.id for call in throwing} <= dead_ids


def test_a_retried_call_of_a_chunk_goes_on_alone(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    worker = start_worker(concurrency=2)
    counters = [tmp_path / f"flaky-{n}" for n in range(4)]
    inputs = [{"counter": str(c), "succeed_on": 2} for c in counters]
    results = client.map("flaky", inputs, queue=_queue_of(worker), chunk_size=4, wait=60)
    assert all(r.ok and r.metadata["attempts"] == 2 for r in results), results
    assert [len(c.read_text().split()) for c in counters] == [2, 2, 2, 2]


def test_a_chunk_out_of_time_puts_the_rest_back(
    client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    # The shortest visibility timeout allowed leaves a chunk time for one call only:
    # every other call goes back on the queue (and still ends once, with its result).
    settings = load_settings(
        REDELIVERY_CONFIG, environ={}, overrides={"redis_url": redis_url, "queue": "tight"}
    )
    env = {"TOOLQ_VISIBILITY_TIMEOUT": "19s"}  # hard limit 4 s + Celery's 15 s
    start_worker(config=REDELIVERY_CONFIG, queues=["tight"], concurrency=2, env=env)
    with ToolClient(settings) as tight:
        results = tight.map("sleep", [{"ms": 50}] * 5, chunk_size=5, wait=60)
    assert all(r.ok for r in results)
    assert len({r.id for r in results}) == 5
    handed = redis.Redis.from_url(redis_url).keys("toolq:chunk:*")
    assert handed, "no chunk handed its calls on"


def test_a_redelivered_chunk_skips_calls_that_ended(
    start_worker: StartWorker, tmp_path: Path, redis_url: str
) -> None:
    settings = load_settings(
        REDELIVERY_CONFIG,
        environ={},
        overrides={"redis_url": redis_url, "queue": "redeliver-chunk"},
    )
    with ToolClient(settings) as client:
        doomed = start_worker(config=REDELIVERY_CONFIG, queues=["redeliver-chunk"], concurrency=1)
        markers = [tmp_path / f"m{n}" for n in range(3)]
        inputs = [
            {"marker": str(markers[0]), "ms": 10},
            {"marker": str(markers[1]), "ms": 2500},
            {"marker": str(markers[2]), "ms": 10},
        ]
        calls = client.enqueue_many("marked_sleep", inputs, chunk_size=3)
        assert wait_until(markers[1].exists, 20)
        first = calls[0].result(timeout=5)
        doomed.kill()  # mid-way: call 0 ended, call 1 running, call 2 not started
        markers[0].unlink()
        survivor = start_worker(config=REDELIVERY_CONFIG, queues=["redeliver-chunk"], concurrency=1)
        results = client.gather(calls, wait=90)
    assert all(r.ok for r in results), [(r.error, r.metadata) for r in results if r.error]
    assert results[0] == first and not markers[0].exists()  # not run again
    assert results[1].metadata["worker"] == survivor.hostname
    assert results[2].metadata["worker"] == survivor.hostname


def test_a_malformed_chunk_answers_every_caller_and_the_worker_goes_on(
    client: ToolClient, start_worker: StartWorker
) -> None:
    worker = start_worker(concurrency=2)
    queue = _queue_of(worker)
    ids = [str(uuid.uuid4()) for _ in range(2)]
    bad = [{"id": ids[0], "call": {"tool_id": "echo"}}, {"id": ids[1]}, {"no": "id"}]
    client.app.send_task(RUN_BATCH_TASK, args=[bad], queue=queue)
    for call_id in ids:
        answer = client.call(call_id).result(timeout=30)
        assert answer.error is not None and answer.error.name == "PoisonMessage"
    # a chunk whose calls are well-formed but one is not a call: only that one fails
    ids = [str(uuid.uuid4()) for _ in range(2)]
    mixed = [{"id": ids[0], "call": {"tool_id": "echo", "input": 1}}, {"id": ids[1], "call": 7}]
    client.app.send_task(RUN_BATCH_TASK, args=[mixed], queue=queue)
    good, broken = (client.call(i).result(timeout=30) for i in ids)
    assert good.ok and good.result == {"echo": 1}
    assert broken.error is not None and broken.error.kind == "invalid_input"
    assert client.run("echo", {"still": "serving"}, queue=queue, wait=30).ok


def test_enqueue_many_refuses_a_bad_input_before_sending_any(
    client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    from toolq.errors import InvalidInput

    queue = f"never-{uuid.uuid4().hex[:6]}"
    try:
        client.enqueue_many("echo", [{"ok": 1}, {"x": float("nan")}], queue=queue)
    except InvalidInput as exc:
        assert "input 1" in str(exc)
    else:
        raise AssertionError("a NaN input was accepted")
    assert redis.Redis.from_url(redis_url).llen(queue) == 0


def test_run_batch_from_a_file(tmp_path: Path, start_worker: StartWorker, redis_url: str) -> None:
    worker = start_worker(concurrency=2)
    lines = tmp_path / "inputs.jsonl"
    lines.write_text("\n".join(json.dumps({"n": n}) for n in range(30)) + "\n\n")
    queue = _queue_of(worker)
    done = toolq(redis_url, "run", "echo", "--batch", str(lines), "-q", queue, "--wait", "60s")
    assert done.returncode == 0, done.stderr
    results = [ToolResult.from_dict(json.loads(line)) for line in done.stdout.splitlines()]
    assert [r.result for r in results] == [{"echo": {"n": n}} for n in range(30)]
    failing = toolq(redis_url, "run", "throws", "--batch", str(tmp_path / "two.jsonl"), "-q", queue)
    assert failing.returncode == 2, failing.stderr  # no such file
    (tmp_path / "two.jsonl").write_text("{}\n[]\n")
    failing = toolq(redis_url, "run", "throws", "--batch", str(tmp_path / "two.jsonl"), "-q", queue)
    assert failing.returncode == 1  # the calls failed; every envelope is still printed
    assert len(failing.stdout.splitlines()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ok": 1}\nnot json\n')
    refused = toolq(redis_url, "run", "echo", "--batch", str(bad), "-q", queue)
    assert refused.returncode != 0 and "line 2" in refused.stderr
