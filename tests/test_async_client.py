"""AsyncToolClient: the asyncio producer, with real Redis, real Celery workers, real Bun."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from cryptography.fernet import Fernet

from tests.conftest import TOOLS_CONFIG, StartWorker, open_sockets, wait_until
from toolq import AsyncToolClient, BrokerUnavailable, InvalidInput, QueueFull, ResultTimeout
from toolq.cli.demo import EXAMPLE_PROJECT
from toolq.cli.devredis import RedisServer
from toolq.config.loader import load_settings
from toolq.producers.base import prepare_request
from toolq.producers.client import ToolClient
from toolq.workers.process import WorkerProcess

T = TypeVar("T")
UNSERVED = "toolq-test-unserved"
"""A queue no worker consumes: calls sent there wait until cancelled."""


def arun(make: Callable[[AsyncToolClient], Awaitable[T]], settings: Any) -> T:
    """Run ``make(client)`` in a fresh event loop with a fresh client, closed after."""

    async def main() -> T:
        async with AsyncToolClient(settings) as client:
            return await make(client)

    return asyncio.run(main())


def test_the_async_client_sends_the_sync_clients_message(settings: Any, redis_url: str) -> None:
    """One message contract: the same request sent by both clients is the same Redis entry
    (apart from kombu's delivery tag and Celery's per-app reply_to), on the same list."""
    queue = f"q-wire-{uuid.uuid4().hex[:8]}"
    request = prepare_request(settings, "echo", {"a": [1, 2]}, {"K": "v"}, "2s", priority=4)
    call_id = str(uuid.uuid4())
    with ToolClient(settings) as sync:
        sync._send(request, call_id, queue)

    async def send(client: AsyncToolClient) -> None:
        await client._push(client._call_entries(request, call_id, queue))

    arun(send, settings)
    with redis.Redis.from_url(redis_url) as connection:
        lists = [key for key in connection.keys(f"{queue}*") if b"binding" not in key]
        assert lists == [f"{queue}\x06\x165".encode()]  # priority 4: kombu's step 9 - 4
        entries = [json.loads(raw) for raw in connection.lrange(lists[0], 0, -1)]
        connection.delete(lists[0])
    assert len(entries) == 2
    for entry in entries:
        del entry["properties"]["delivery_tag"], entry["properties"]["reply_to"]
    assert entries[0] == entries[1]
    assert entries[0]["headers"]["id"] == call_id


def test_async_enqueue_run_map_gather_and_as_completed(
    settings: Any, worker: WorkerProcess
) -> None:
    async def scenario(client: AsyncToolClient) -> None:
        result = await client.run("echo", {"a": 1}, wait=60)
        assert result.ok and result.result == {"echo": {"a": 1}}
        calls = await client.enqueue_many("echo", [{"i": i} for i in range(40)])
        assert len({call.id for call in calls}) == 40
        results = await client.gather(calls, wait=60)
        assert [r.result["echo"]["i"] for r in results] == list(range(40))
        calls = await client.enqueue_many("echo", [{"i": i} for i in range(12)], chunk_size=1)
        seen = [r.result["echo"]["i"] async for r in client.as_completed(calls, wait=60)]
        assert sorted(seen) == list(range(12))
        mapped = await client.map("echo", [{"n": n} for n in range(5)], wait=60)
        assert [r.result["echo"]["n"] for r in mapped] == list(range(5))
        # a handle by id, and results awaited by many tasks at once
        call = await client.enqueue("echo", {"by": "id"})
        again = client.call(call.id, "echo")
        both = await asyncio.gather(call.result(timeout=60), again.result(timeout=60))
        assert both[0] == both[1] and both[0].result == {"echo": {"by": "id"}}
        assert await again.ready() and await again.state() == "SUCCESS"
        # a failed call is a failed result, not an exception
        failed = await client.run("throws", wait=60)
        assert not failed.ok and failed.error is not None
        # idempotency: the same request under one key is the first call
        key = f"order-{uuid.uuid4().hex[:8]}"
        first = await client.enqueue("echo", {"x": 1}, idempotency_key=key)
        second = await client.enqueue("echo", {"x": 1}, idempotency_key=key)
        assert first.id == second.id
        with pytest.raises(InvalidInput, match="idempotency key"):
            await client.enqueue("echo", {"x": 2}, idempotency_key=key)

    arun(scenario, settings)


def test_async_client_refuses_bad_input_before_sending(settings: Any, redis_url: str) -> None:
    async def scenario(client: AsyncToolClient) -> None:
        with pytest.raises(InvalidInput):
            await client.enqueue("../etc/passwd", {})
        with pytest.raises(InvalidInput, match="priority"):
            await client.enqueue("echo", {}, priority=12)
        with pytest.raises(InvalidInput, match="input 1"):
            await client.enqueue_many("echo", [{}, {"x": float("nan")}], queue=UNSERVED)
        with pytest.raises(InvalidInput):
            await client.enqueue("echo", {}, timeout="soon")
        with pytest.raises(InvalidInput):
            await client.cancel("not-a-call-id")

    arun(scenario, settings)
    with redis.Redis.from_url(redis_url) as connection:
        assert connection.llen(UNSERVED) == 0


def test_async_queue_full_and_result_timeout(settings: Any, redis_url: str) -> None:
    full = "toolq-test-full"  # capped at 3 (tests/tools/compozy.yaml), never consumed
    with redis.Redis.from_url(redis_url) as connection:
        connection.delete(full)

    async def scenario(client: AsyncToolClient) -> None:
        calls = [await client.enqueue("echo", {}, queue=full) for _ in range(3)]
        with pytest.raises(QueueFull):
            await client.enqueue("echo", {}, queue=full)
        with pytest.raises(QueueFull):
            await client.enqueue("echo", {}, queue=full, block=0.3)
        with pytest.raises(ResultTimeout) as timeout:
            await calls[1].result(timeout=0.5)
        assert timeout.value.call_id == calls[1].id
        with pytest.raises(ResultTimeout):
            await client.gather(calls, wait=0.3)
        assert client.waiting == 0  # a waiter that gave up holds no subscription

    try:
        arun(scenario, settings)
    finally:
        with redis.Redis.from_url(redis_url) as connection:
            connection.delete(full)


def test_cancelling_the_awaiting_task_leaves_the_call_running(
    settings: Any, worker: WorkerProcess
) -> None:
    """A FastAPI client that disconnects cancels the awaiting task: the call still runs
    and its result is stored for whoever asks later."""

    async def scenario(client: AsyncToolClient) -> None:
        call = await client.enqueue("sleep", {"ms": 400})
        waiter = asyncio.create_task(call.result(timeout=60))
        while client.waiting == 0:  # the waiter subscribed
            await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert client.waiting == 0
        later = await client.call(call.id, "sleep").result(timeout=60)
        assert later.ok, later.error

    arun(scenario, settings)


def test_cancel_on_exit_cancels_the_call_with_its_waiter(settings: Any, redis_url: str) -> None:
    async def scenario(client: AsyncToolClient) -> None:
        left = await client.enqueue("echo", {}, queue=UNSERVED)
        kept = await client.enqueue("echo", {}, queue=UNSERVED)
        waiters = [
            asyncio.create_task(left.result(cancel_on_exit=True)),
            asyncio.create_task(kept.result()),
        ]
        while client.waiting < 2:
            await asyncio.sleep(0.01)
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        outcome = await left.result(timeout=5)
        assert outcome.error is not None and outcome.error.kind == "cancelled"
        assert not await kept.ready()  # left alone: still queued
        with pytest.raises(ResultTimeout):
            await kept.result(timeout=0.2, cancel_on_exit=True)  # a timeout is an exit too
        assert (await kept.result(timeout=5)).error.kind == "cancelled"  # type: ignore[union-attr]
        assert await kept.cancel() == "finished"

    try:
        arun(scenario, settings)
    finally:
        with redis.Redis.from_url(redis_url) as connection:
            connection.delete(UNSERVED)


def test_many_waiters_share_one_pubsub_connection(settings: Any, redis_url: str) -> None:
    """500 tasks awaiting 500 calls hold at most 3 connections (2 for commands, 1 pub/sub);
    results published while they wait (here: cancels) reach every one of them."""
    count = 500

    async def scenario(client: AsyncToolClient) -> None:
        calls = await client.enqueue_many("echo", [{"i": i} for i in range(count)], queue=UNSERVED)
        before = open_sockets()
        waiters = [asyncio.create_task(call.result(timeout=60)) for call in calls]
        while not all_subscribed(client, count):
            await asyncio.sleep(0.01)
        during = open_sockets()
        await asyncio.gather(*(client.cancel(call.id, "echo") for call in calls[::2]))
        results = await asyncio.gather(*waiters[::2])
        assert all(r.error is not None and r.error.kind == "cancelled" for r in results)
        assert not any(waiter.done() for waiter in waiters[1::2])
        assert during - before <= 3, (before, during)
        for waiter in waiters[1::2]:
            waiter.cancel()
        await asyncio.gather(*waiters[1::2], return_exceptions=True)
        assert client.waiting == 0

    try:
        arun(scenario, settings)
    finally:
        with redis.Redis.from_url(redis_url) as connection:
            for key in connection.keys(f"{UNSERVED}*"):
                connection.delete(key)


def all_subscribed(client: AsyncToolClient, count: int) -> bool:
    """``count`` calls awaited and every one's subscription confirmed by Redis."""
    hub = client._connections.hub
    return (
        hub is not None
        and client.waiting == count
        and len(hub._subscribed) == count
        and not hub._confirming
    )


def test_a_redis_restart_while_awaiting_loses_nothing() -> None:
    """Waiters ride out a Redis restart: calls finished across it are delivered, and a
    result stored while the waiter was reconnecting (no publish heard) is read back."""
    server = RedisServer(persistent=True).start()
    try:
        settings = load_settings(TOOLS_CONFIG, environ={}, overrides={"redis_url": server.url})
        with (
            ToolClient(settings) as sync,
            WorkerProcess(config=TOOLS_CONFIG, redis_url=server.url, concurrency=2) as worker,
        ):
            worker.start(sync.app)

            async def scenario(client: AsyncToolClient) -> None:
                calls = await client.enqueue_many(
                    "sleep", [{"ms": 150} for _ in range(12)], chunk_size=1
                )
                unserved = await client.enqueue("echo", {}, queue=UNSERVED)
                running = asyncio.create_task(client.gather(calls, wait=120))
                quiet = asyncio.create_task(unserved.result(timeout=120))
                while client.waiting < 13 and not running.done():
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(server.stop)  # SIGTERM: AOF written, mid-load
                await asyncio.sleep(1.0)
                await asyncio.to_thread(server.start)
                # Stored without a publish, as a result written before the waiter's
                # subscription came back would be: only reading the key finds it.
                key, value, _ = stored_result(client, unserved.id)
                with redis.Redis.from_url(server.url) as connection:
                    connection.set(key, value)
                results = await running
                assert all(r.ok for r in results), [r.error for r in results if r.error]
                assert (await quiet).error.kind == "cancelled"  # type: ignore[union-attr]

            arun(scenario, settings)
            assert worker.proc is not None and worker.proc.poll() is None
    finally:
        server.close()


def stored_result(client: AsyncToolClient, call_id: str) -> tuple[str, str, int | None]:
    from toolq.producers.cancel import cancelled_failure, stored_failure

    return stored_failure(client.app, call_id, cancelled_failure(call_id, "echo", 0.0))


def test_a_redis_outage_longer_than_the_wait_is_broker_unavailable() -> None:
    server = RedisServer().start()
    try:
        settings = load_settings(TOOLS_CONFIG, environ={}, overrides={"redis_url": server.url})

        async def scenario(client: AsyncToolClient) -> None:
            call = await client.enqueue("echo", {}, queue=UNSERVED)
            waiter = asyncio.create_task(call.result(timeout=5))
            while client.waiting == 0:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(server.stop)
            with pytest.raises(BrokerUnavailable):
                await waiter
            with pytest.raises(BrokerUnavailable):
                await client.enqueue("echo", {})

        arun(scenario, settings)
    finally:
        server.close()


def test_a_signed_and_sealed_async_call_runs_on_a_worker_with_the_key(
    redis_url: str, start_worker: StartWorker
) -> None:
    """Signing and env sealing apply to the asyncio client: they are in the shared path."""
    key = Fernet.generate_key().decode()
    worker = start_worker(env={"TOOLQ_SECRET_KEY": key})
    queue = next(arg.split("=", 1)[1] for arg in worker.argv if arg.startswith("--queues="))
    settings = load_settings(
        TOOLS_CONFIG, environ={"TOOLQ_SECRET_KEY": key}, overrides={"redis_url": redis_url}
    )

    async def scenario(client: AsyncToolClient) -> None:
        result = await client.run(
            "env", {"keys": ["SECRET_X"]}, env={"SECRET_X": "s3cr3t"}, queue=queue, wait=60
        )
        assert result.ok, result.error
        assert "s3cr3t" in json.dumps(result.result)
        chunked = await client.map("echo", [{"i": i} for i in range(40)], queue=queue, wait=60)
        assert [r.result["echo"]["i"] for r in chunked] == list(range(40))  # signed chunks

    arun(scenario, settings)


WEATHER_CONFIG = EXAMPLE_PROJECT / "compozy.yaml"
ASYNC_CLIENT_DOC = Path(__file__).resolve().parents[1] / "docs" / "async-client.md"


def documented_fastapi_app() -> str:
    """The FastAPI example of docs/async-client.md, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", ASYNC_CLIENT_DOC.read_text(), re.S)
    apps = [block for block in blocks if "from fastapi import FastAPI" in block]
    assert len(apps) == 1, "docs/async-client.md has one FastAPI example"
    return apps[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_documented_fastapi_app_served_by_uvicorn(redis_url: str, tmp_path: Path) -> None:
    """The documented app (docs/async-client.md) as written, served by uvicorn in its own
    process, a real worker on the weather project behind it, called over HTTP (many
    requests at once)."""
    queue = f"q-weather-{uuid.uuid4().hex[:8]}"
    (tmp_path / "app.py").write_text(documented_fastapi_app())
    settings = load_settings(WEATHER_CONFIG, environ={}, overrides={"redis_url": redis_url})
    port = free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TOOLQ_")},
        "TOOLQ_CONFIG": str(WEATHER_CONFIG),
        "TOOLQ_REDIS_URL": redis_url,
        "TOOLQ_QUEUE": queue,
    }
    with (
        ToolClient(settings) as sync,
        WorkerProcess(config=WEATHER_CONFIG, redis_url=redis_url, queues=[queue]) as worker,
    ):
        worker.start(sync.app)
        log = (tmp_path / "uvicorn.log").open("w+")
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)],
            cwd=tmp_path,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            assert wait_until(lambda: answers(base), 60), (tmp_path / "uvicorn.log").read_text()

            async def many() -> list[httpx.Response]:
                async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                    cities = [f"city-{n}" for n in range(20)]
                    return await asyncio.gather(*(http.get(f"/weather/{c}") for c in cities))

            one = httpx.get(f"{base}/weather/Lisbon", timeout=60)
            assert one.status_code == 200, one.text
            assert one.json()["city"] == "Lisbon" and "temperature_c" in one.json()
            replies = asyncio.run(many())
            assert [r.status_code for r in replies] == [200] * 20
            assert [r.json()["city"] for r in replies] == [f"city-{n}" for n in range(20)]
        finally:
            server.send_signal(signal.SIGTERM)  # lifespan: the client closes
            # uvicorn shuts down gracefully, then re-raises the signal (or exits 0)
            assert server.wait(timeout=30) in (0, -signal.SIGTERM)
            output = (tmp_path / "uvicorn.log").read_text()
            log.close()
        assert "Traceback" not in output, output
        assert "Application shutdown complete" in output


def answers(base: str) -> bool:
    try:
        httpx.get(f"{base}/docs", timeout=2)
    except httpx.HTTPError:
        return False
    return True


def test_an_async_cancel_stops_queued_and_running_calls_on_a_worker(
    settings: Any, start_worker: StartWorker, tmp_path: Path
) -> None:
    """The async cancel writes what the sync one does (set, channel, result): a queued
    call is dropped by the worker that receives it, a running one is stopped."""
    queue, log = f"q-{uuid.uuid4().hex[:8]}", tmp_path / "log"

    async def cancel_queued(client: AsyncToolClient) -> str:
        queued = await client.enqueue("stamp", {"log": str(log), "tag": "queued"}, queue=queue)
        assert await queued.cancel() == "cancelled"
        assert (await queued.result(timeout=5)).error.kind == "cancelled"  # type: ignore[union-attr]
        return queued.id

    queued_id = arun(cancel_queued, settings)
    start_worker(queues=[queue], concurrency=1)

    async def cancel_running(client: AsyncToolClient) -> None:
        running = await client.enqueue(
            "stamp", {"log": str(log), "tag": "running", "ms": 4000}, queue=queue
        )
        async with asyncio.timeout(60):
            while "start running" not in (log.read_text() if log.exists() else ""):
                await asyncio.sleep(0.05)
        assert await running.cancel() == "cancelled"
        async with asyncio.timeout(60):  # the worker's own envelope, once Bun is gone
            while "worker" not in (final := await client.call(running.id).result()).metadata:
                await asyncio.sleep(0.1)
        assert final.error is not None and final.error.kind == "cancelled"
        assert await client.queue_length(queue) == 0
        assert (await client.call(queued_id).result(timeout=5)).error.kind == "cancelled"  # type: ignore[union-attr]

    arun(cancel_running, settings)
    lines = log.read_text().split("\n")
    assert not any("queued" in line for line in lines)  # never started
    assert not any(line.startswith("end running") for line in lines)  # stopped mid-sleep
