"""No lost calls when a worker dies while waiting for work (issue 31).

Redis hands a call to a waiting worker's pending pop as long as the worker's connection is
open, however dead or frozen the worker is. kombu's ``BRPOP`` recorded it as unacknowledged
only once the worker read it, so a worker that never read it lost it for good. The worker
here is frozen (SIGSTOP) while Redis shows it waiting, the call is sent, the worker is
SIGKILLed: deterministic, where "SIGKILL, then enqueue at once" loses the call only when
the enqueue beats the kernel closing the dead worker's socket.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import pytest
import redis

from tests.conftest import TOOLS, StartWorker
from toolq import QueueFull, ToolClient
from toolq.config.celery_app import celery_config, queue_lists
from toolq.config.loader import load_settings
from toolq.workers import brokerfix
from toolq.workers.process import WorkerProcess

REDELIVERY_CONFIG = TOOLS / "redelivery.yaml"


def socket_ports(pid: int) -> set[int]:
    """The local TCP ports of ``pid``'s open sockets."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def waiting_in_redis(client: redis.Redis, pid: int) -> bool:
    """Whether one of ``pid``'s connections is blocked in Redis, waiting for a call."""
    ports = socket_ports(pid)
    return any(
        "b" in entry["flags"] and int(entry["addr"].rsplit(":", 1)[1]) in ports
        for entry in client.client_list()
    )


def freeze_while_waiting(client: redis.Redis, worker: WorkerProcess) -> None:
    """SIGSTOP ``worker`` at a moment its pop is pending in Redis (its wait lasts a second
    at most, so try until the freeze catches one)."""
    for _ in range(100):
        os.kill(worker.pid, signal.SIGSTOP)
        if waiting_in_redis(client, worker.pid):
            return
        os.kill(worker.pid, signal.SIGCONT)
        time.sleep(0.05)
    pytest.fail("the idle worker was never seen waiting in Redis")


def where_is(client: redis.Redis, settings: Any, queue: str, call_id: str) -> str | None:
    """Where in Redis the message naming ``call_id`` is: "waiting", "unacked" or None (a
    chunk names its first call in its headers' argsrepr, a single call in its id)."""
    options = celery_config(settings, worker=True)["broker_transport_options"]
    unacked = client.hvals(options.get("unacked_key", "unacked"))
    if any(call_id.encode() in entry for entry in unacked):
        return "unacked"
    for name in queue_lists(queue):
        if any(call_id.encode() in entry for entry in client.lrange(name, 0, -1)):
            return "waiting"
    return None


@pytest.mark.parametrize("calls", [1, 40], ids=["one-call", "chunk-of-40"])
def test_a_call_sent_as_an_idle_worker_dies_runs_once(
    calls: int, start_worker: StartWorker, redis_url: str
) -> None:
    queue = f"lostq-{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        REDELIVERY_CONFIG, environ={}, overrides={"redis_url": redis_url, "queue": queue}
    )
    # The worker's settings (its queue given by --queues) name its unacked index.
    worker_settings = load_settings(
        REDELIVERY_CONFIG, environ={}, overrides={"redis_url": redis_url}
    )
    db = redis.Redis.from_url(redis_url)
    with ToolClient(settings) as client:
        doomed = start_worker(config=REDELIVERY_CONFIG, queues=[queue], concurrency=1)
        assert client.run("echo", {}, wait=30).ok  # connections made: the next send is quick
        for trial in range(40):  # each catches the worker waiting, or tries again
            inputs = [{"trial": trial, "n": n} for n in range(calls)]
            freeze_while_waiting(db, doomed)
            sent = client.enqueue_many("echo", inputs, chunk_size=40)
            # Redis hands the message to the frozen worker's pending pop if it is still
            # pending (a wait is short), or keeps it waiting. Either way it must
            # stay in Redis: waiting, or recorded as unacknowledged.
            place = where_is(db, worker_settings, queue, sent[0].id)
            assert place is not None, "the call is in neither the queue nor the unacked index"
            if place == "unacked":
                break  # handed to the frozen worker: the case under test
            os.kill(doomed.pid, signal.SIGCONT)  # it came too late: run it and try again
            assert all(result.ok for result in client.gather(sent, wait=30))
        else:
            pytest.fail("no call reached the frozen worker in 40 trials")
        doomed.kill()
        survivor = start_worker(config=REDELIVERY_CONFIG, queues=[queue], concurrency=4)
        results = client.gather(sent, wait=90)  # the visibility timeout (20 s) and sweep
        assert all(result.ok for result in results), [r.error for r in results if r.error]
        logs = doomed.output() + survivor.output()  # one line per run: "call <id> echo: ..."
        assert [logs.count(f"call {call.id} echo:") for call in sent] == [1] * calls
        # The lost delivery is in each call's history, and counts as an attempt.
        for result in results:
            assert result.metadata["attempts"] == 2
            [lost] = result.metadata["attempt_history"]
            assert lost["name"] == "WorkerLost" and lost["redeliveries"] == 1
    db.close()


# -- all-or-nothing bulk enqueue ------------------------------------------------------------


def test_a_bulk_enqueue_on_a_capped_queue_sends_all_or_nothing(
    client: ToolClient, redis_url: str
) -> None:
    queue = "toolq-test-full"  # capped at 3 messages in tests/tools/compozy.yaml; never read
    store = redis.Redis.from_url(redis_url)
    try:
        store.delete(*queue_lists(queue))
        client.enqueue("echo", {}, queue=queue)
        inputs = [{"n": n} for n in range(10)]
        with pytest.raises(QueueFull) as refused:  # 5 chunks of 2, room for 2
            client.enqueue_many("echo", inputs, queue=queue, chunk_size=2)
        assert refused.value.needed == 5 and refused.value.length == 1
        assert "nothing was enqueued" in str(refused.value)
        assert client.queue_length(queue) == 1  # not one chunk of them
        with pytest.raises(QueueFull):  # more chunks than the cap: refused at once
            client.enqueue_many("echo", inputs, queue=queue, chunk_size=2, block=30)
        assert client.queue_length(queue) == 1
        sent = client.enqueue_many("echo", inputs, queue=queue, chunk_size=5)  # 2 chunks fit
        assert len(sent) == 10 and client.queue_length(queue) == 3
    finally:
        store.delete(*queue_lists(queue))
        store.close()


@pytest.mark.parametrize(
    ("version", "prefix", "reliable"),
    [("7.0.15", "", True), ("6.2.0", "", True), ("6.0.9", "", False), ("7.2.4", "app:", False)],
)
def test_the_reliable_pop_needs_redis_6_2_and_no_key_prefix(
    version: str, prefix: str, reliable: bool
) -> None:
    class Client:
        def info(self, section: str) -> dict[str, str]:
            return {"redis_version": version}

    class Channel:
        global_keyprefix = prefix
        client = Client()

    assert brokerfix._reliable(Channel()) is reliable
