"""Signed calls, projects as a boundary, restricted remote control and log-safe values,
end to end: two projects on one Redis, the test process acting as the forger (anyone who
can write to Redis), real Celery workers and Bun."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet

from tests.conftest import TOOLS_CONFIG, StartWorker, wait_until
from toolq.config.celery_app import RUN_TOOL_TASK, queue_lists
from toolq.config.loader import load_settings
from toolq.producers.client import ToolClient
from toolq.workers.deadletter import DeadLetters
from toolq.workers.process import WorkerProcess

BETA_KEY = Fernet.generate_key().decode()
ALPHA_KEY = Fernet.generate_key().decode()
BETA = load_settings(TOOLS_CONFIG, environ={}).project  # the test tool project's name
READ_PASSWD = {"action": "read", "path": "/etc/passwd"}


def producer(redis_url: str, key: str, **overrides: Any) -> ToolClient:
    settings = load_settings(
        TOOLS_CONFIG,
        environ={"TOOLQ_SECRET_KEY": key},
        overrides={"redis_url": redis_url, **overrides},
    )
    return ToolClient(settings)


def queue_of(worker: WorkerProcess) -> str:
    return next(arg.split("=", 1)[1] for arg in worker.argv if arg.startswith("--queues="))


@pytest.fixture
def beta_worker(start_worker: StartWorker) -> WorkerProcess:
    """Project beta's worker (the test tool project), with beta's key."""
    return start_worker(env={"TOOLQ_SECRET_KEY": BETA_KEY})


@pytest.fixture
def beta(redis_url: str) -> Iterator[ToolClient]:
    """Beta's own producer: same project, same key."""
    with producer(redis_url, BETA_KEY) as client:
        yield client


def forge(client: ToolClient, queue: str, tool_id: str, tool_input: Any, **headers: Any) -> str:
    """Put a run_tool message on ``queue`` as anyone with Redis access can: an empty env
    (nothing to seal), no key."""
    call_id = str(uuid.uuid4())
    message = {"tool_id": tool_id, "input": tool_input, "env": {}, "enqueued_at": time.time()}
    client.app.send_task(
        RUN_TOOL_TASK,
        args=[message],
        task_id=call_id,
        queue=queue,
        shadow=f"toolq:{tool_id}",
        headers=headers or None,
    )
    return call_id


def poison_letters(redis_url: str, call_id: str) -> list[dict[str, Any]]:
    with redis.Redis.from_url(redis_url) as connection:
        letters = DeadLetters(connection, 10_000, namespace=load_settings(TOOLS_CONFIG).keys)
        return [e for e in letters.list() if e["id"] == call_id]


def test_a_forged_call_never_runs_on_a_worker_with_a_key(
    client: ToolClient, beta: ToolClient, beta_worker: WorkerProcess, redis_url: str
) -> None:
    queue = queue_of(beta_worker)
    unsigned = forge(client, queue, "probe", READ_PASSWD)
    bad = forge(client, queue, "probe", READ_PASSWD, toolq_sig="v1:" + "0" * 64)
    for call_id, words in ((unsigned, "unsigned call refused"), (bad, "signature refused")):
        answer = client.call(call_id).result(timeout=60)
        assert answer.error is not None and answer.error.kind == "invalid_input"
        assert answer.error.name == "PoisonMessage" and words in answer.error.message
        assert "root:" not in json.dumps(answer.to_dict())
        letters = poison_letters(redis_url, call_id)  # dead-lettered as poison, never run
        assert len(letters) == 1 and letters[0]["retry_stopped"] == "poison"
        assert answer.metadata["attempts"] == 0
    log = beta_worker.output()
    assert f"call {unsigned} " not in log and f"call {bad} " not in log  # the runner's line
    # beta's own producer signs: its calls run, on the same worker, after the forgeries
    assert beta.run("echo", {"signed": True}, queue=queue, wait=60).result == {
        "echo": {"signed": True}
    }
    assert beta_worker.proc is not None and beta_worker.proc.poll() is None


def test_a_signed_message_altered_or_moved_in_redis_is_refused(
    beta: ToolClient, beta_worker: WorkerProcess, redis_url: str
) -> None:
    queue = queue_of(beta_worker)
    parking = f"parking-{uuid.uuid4().hex[:8]}"  # nobody consumes it
    beta.enqueue("echo", {"n": 1}, queue=parking)
    beta.enqueue("echo", {"n": 2}, queue=parking)
    with redis.Redis.from_url(redis_url) as connection:
        raws = [raw for name in queue_lists(parking) for raw in connection.lrange(name, 0, -1)]
        connection.delete(*queue_lists(parking), f"_kombu.binding.{parking}")
        altered, moved = (json.loads(raw) for raw in raws)
        args, kwargs, embed = json.loads(base64.b64decode(altered["body"]))
        args[0]["tool_id"], args[0]["input"] = "probe", READ_PASSWD
        altered["body"] = base64.b64encode(json.dumps([args, kwargs, embed]).encode()).decode()
        for message in (altered, moved):  # moved: signed for the parking queue, not this one
            message["properties"]["delivery_info"] = {"exchange": queue, "routing_key": queue}
            connection.lpush(queue, json.dumps(message))
    for message in (altered, moved):
        answer = beta.call(message["headers"]["id"]).result(timeout=60)
        assert answer.error is not None and answer.error.name == "PoisonMessage"
        assert "signature refused" in answer.error.message
        assert "root:" not in json.dumps(answer.to_dict())


def test_another_projects_calls_are_refused_even_with_the_same_key(
    beta_worker: WorkerProcess, redis_url: str
) -> None:
    queue = queue_of(beta_worker)
    for key in (ALPHA_KEY, BETA_KEY):  # alpha's own key, or beta's leaked to alpha
        with producer(redis_url, key, name="alpha") as alpha:
            refused = alpha.run("probe", READ_PASSWD, queue=queue, wait=60)
        assert refused.error is not None and refused.error.name == "PoisonMessage"
        assert f"sent for project 'alpha', this worker serves project '{BETA}'" in (
            refused.error.message
        )
        assert "root:" not in json.dumps(refused.to_dict())


def test_the_cli_says_why_another_projects_worker_refused_its_call(
    beta_worker: WorkerProcess, redis_url: str
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TOOLQ_")},
        "TOOLQ_REDIS_URL": redis_url,
        "TOOLQ_CONFIG": str(TOOLS_CONFIG),
        "TOOLQ_NAME": "alpha",
        "TOOLQ_SECRET_KEY": ALPHA_KEY,
    }
    queue = queue_of(beta_worker)
    proc = subprocess.run(
        [sys.executable, "-m", "toolq", "run", "echo", "--queue", queue, "--wait", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert "another project refuses it" in proc.stderr  # warned before sending
    error = json.loads(proc.stdout)["error"]
    assert error["name"] == "PoisonMessage"
    assert f"sent for project 'alpha', this worker serves project '{BETA}'" in error["message"]


def test_retries_and_chunks_are_signed_by_the_worker_that_resends_them(
    beta: ToolClient, beta_worker: WorkerProcess, tmp_path: Path
) -> None:
    queue = queue_of(beta_worker)
    single = beta.run("flaky", {"counter": str(tmp_path / "single")}, queue=queue, wait=60)
    assert single.ok and single.metadata["attempts"] == 3, single  # two re-signed retries
    inputs = [{"counter": str(tmp_path / f"chunk-{n}"), "succeed_on": 2} for n in range(4)]
    answers = beta.map("flaky", inputs, queue=queue, chunk_size=4, wait=60)
    assert [a.metadata["attempts"] for a in answers] == [2] * 4, answers  # retried alone
    echoes = beta.map("echo", [{"n": n} for n in range(12)], queue=queue, chunk_size=6, wait=60)
    assert [a.result for a in echoes] == [{"echo": {"n": n}} for n in range(12)]


def test_a_prefork_pool_process_signs_the_retries_it_sends(
    start_worker: StartWorker, redis_url: str, tmp_path: Path
) -> None:
    worker = start_worker(pool="prefork", concurrency=1, env={"TOOLQ_SECRET_KEY": BETA_KEY})
    with producer(redis_url, BETA_KEY) as beta:
        answer = beta.run(
            "flaky", {"counter": str(tmp_path / "c")}, queue=queue_of(worker), wait=60
        )
    assert answer.ok and answer.metadata["attempts"] == 3, answer


def test_a_chunks_remainder_put_back_by_the_worker_is_signed(
    start_worker: StartWorker, redis_url: str
) -> None:
    """redelivery.yaml: a chunk may start a call only within 5 s of its start (visibility
    20 s less Celery's margins) and a call's hard limit is 4 s, so after its first 1.5 s
    call a chunk puts the rest back on the queue as a new chunk, which the worker signs."""
    config = TOOLS_CONFIG.parent / "redelivery.yaml"
    worker = start_worker(config=config, concurrency=1, env={"TOOLQ_SECRET_KEY": BETA_KEY})
    settings = load_settings(
        config, environ={"TOOLQ_SECRET_KEY": BETA_KEY}, overrides={"redis_url": redis_url}
    )
    with ToolClient(settings) as client:
        calls = client.enqueue_many(
            "sleep", [{"ms": 1500}] * 3, queue=queue_of(worker), chunk_size=3
        )
        answers = client.gather(calls, wait=90)
    assert all(a.ok for a in answers), [a.error for a in answers]


def test_a_signed_call_redelivered_after_its_worker_died_still_runs(
    start_worker: StartWorker, redis_url: str, tmp_path: Path
) -> None:
    """kombu restores a dead worker's call as it was sent: its signature still holds (20 s
    visibility timeout in redelivery.yaml)."""
    config = TOOLS_CONFIG.parent / "redelivery.yaml"
    queue = f"redeliver-{uuid.uuid4().hex[:8]}"
    keyed = {"TOOLQ_SECRET_KEY": BETA_KEY}
    doomed = start_worker(config=config, queues=[queue], concurrency=1, env=keyed)
    settings = load_settings(config, environ=keyed, overrides={"redis_url": redis_url})
    marker = tmp_path / "started"
    with ToolClient(settings) as client:
        call = client.enqueue("marked_sleep", {"marker": str(marker), "ms": 2500}, queue=queue)
        assert wait_until(marker.exists, 30)
        doomed.kill()
        survivor = start_worker(config=config, queues=[queue], concurrency=1, env=keyed)
        answer = call.result(timeout=90)
    assert answer.ok, answer.error
    assert answer.metadata["worker"] == survivor.hostname


def test_remote_control_cannot_stop_a_worker_or_move_its_queues(
    client: ToolClient, start_worker: StartWorker
) -> None:
    worker = start_worker()
    queue, other = queue_of(worker), f"stolen-{uuid.uuid4().hex[:8]}"
    control = client.app.control
    for command, arguments in (
        ("add_consumer", {"queue": other}),
        ("cancel_consumer", {"queue": queue}),
        ("pool_restart", {}),
        ("shutdown", {}),
    ):
        replies = control.broadcast(
            command, arguments=arguments, destination=[worker.hostname], reply=True, timeout=5
        )
        assert replies and "error" in replies[0][worker.hostname], (command, replies)
    assert worker.proc is not None and worker.proc.poll() is None  # not shut down
    consumed = control.inspect(destination=[worker.hostname]).active_queues()
    assert [q["name"] for q in consumed[worker.hostname]] == [queue]  # nothing added or cancelled
    assert client.run("echo", {"still": "serving"}, queue=queue, wait=30).ok
    # toolq bench's workers opt in to Celery's full set
    trusting = start_worker(env={"TOOLQ_REMOTE_CONTROL": "all"})
    replies = control.add_consumer(other, destination=[trusting.hostname], reply=True, timeout=5)
    assert replies and "ok" in replies[0][trusting.hostname], replies


def test_untrusted_values_never_forge_a_log_line(client: ToolClient, worker: WorkerProcess) -> None:
    forged = f"FORGED-{uuid.uuid4().hex[:8]}"
    refused = client.call(forge(client, worker_queue(client), f"x\n{forged} ok", {})).result(60)
    assert refused.error is not None and refused.error.kind == "invalid_input"
    assert client.run("console", wait=30).ok  # its stderr is logged, line by line
    assert wait_until(lambda: "  | [WARN] warn line" in worker.output(), 10), worker.output()
    log = worker.output()
    assert f"x\\n{forged} ok" in log  # escaped, on the line it belongs to
    assert not [line for line in log.splitlines() if line.startswith(forged)]
    assert not [line for line in log.splitlines() if line.startswith("[WARN] warn line")]


def worker_queue(client: ToolClient) -> str:
    return client.settings.queue
