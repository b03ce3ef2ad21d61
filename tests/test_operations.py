"""Operations: Flower over HTTP, metrics scraped, scaling out, routing, status, loadtest."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from tests.conftest import (
    TOOLS_CONFIG,
    StartWorker,
    check_a_closed_client_leaves_no_socket_open,
    wait_until,
)
from toolq import ToolClient
from toolq.cli.devredis import answers, redis_server_binary
from toolq.config.loader import load_settings
from toolq.workers.process import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, auth: str | None = None) -> str:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def queue_of(worker: WorkerProcess) -> str:
    return next(arg.split("=", 1)[1] for arg in worker.argv if arg.startswith("--queues="))


def toolq(redis_url: str, *args: str, env: dict[str, str] | None = None) -> Any:
    full_env = {
        **os.environ,
        "TOOLQ_REDIS_URL": redis_url,
        "TOOLQ_CONFIG": str(TOOLS_CONFIG),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "toolq", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


# -- Flower --------------------------------------------------------------------------------


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    auth = "ops:s3cret"
    secret = tmp_path / "flower-auth"
    secret.write_text(auth + "\n")
    env = {**os.environ, "TOOLQ_REDIS_URL": redis_url, "TOOLQ_CONFIG": str(TOOLS_CONFIG)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolq", "flower", f"--port={port}", f"--basic-auth-file={secret}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
        assert b"s3cret" not in cmdline.read()  # the password is not in the process list

    def up() -> bool:
        try:
            get(f"{base}/healthcheck")
            return True
        except (OSError, urllib.error.URLError):
            return False

    try:
        assert wait_until(up, 30), "Flower did not start"
        yield base, auth
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_flower_answers_only_its_own_host_names(flower: tuple[str, str]) -> None:
    """A Flower on 127.0.0.1 answered any Host: a page elsewhere whose name resolves to
    127.0.0.1 (DNS rebinding) could drive its API from the operator's browser."""
    base, _ = flower

    def status(host: str) -> int:
        request = urllib.request.Request(f"{base}/healthcheck", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status("localhost:5555") == 200 and status("127.0.0.1") == 200
    assert status("rebind.attacker.example:5555") == 403
    assert status("evil.localhost.example") == 403


def test_flower_shows_workers_calls_and_queues(
    client: ToolClient, worker: WorkerProcess, flower: tuple[str, str]
) -> None:
    base, auth = flower
    with pytest.raises(urllib.error.HTTPError):
        get(f"{base}/api/workers")  # no credentials, no data

    def worker_listed() -> bool:
        return worker.hostname in json.loads(get(f"{base}/api/workers?refresh=1", auth))

    assert wait_until(worker_listed, 20)
    result = client.run("env", {"keys": ["API_TOKEN"]}, env={"API_TOKEN": "tok-123456"}, wait=30)
    assert result.ok

    def call_listed() -> dict[str, Any] | None:
        tasks = json.loads(get(f"{base}/api/tasks", auth))
        task = tasks.get(result.id)
        return task if task and task["state"] == "SUCCESS" else None

    assert wait_until(lambda: call_listed() is not None, 20)
    task = call_listed()
    assert task is not None
    assert "'env'" in task["args"] and "input=" in task["args"]  # the tool id is readable
    assert "tok-123456" not in task["args"]  # secrets in env are redacted
    assert task["worker"] == worker.hostname and task["runtime"] is not None
    lengths = json.loads(get(f"{base}/api/queues/length", auth))["active_queues"]
    assert any(queue["name"] == "toolq-test-tools" for queue in lengths)  # the project's


def test_flower_shows_failed_calls_as_failure_under_the_tool_id(
    client: ToolClient, worker: WorkerProcess, flower: tuple[str, str]
) -> None:
    base, auth = flower

    def worker_listed() -> bool:  # Flower is listening to events from here on
        return worker.hostname in json.loads(get(f"{base}/api/workers?refresh=1", auth))

    assert wait_until(worker_listed, 20)
    ok = client.run("echo", {"x": 1}, wait=30)
    failed = client.run("throws", {}, wait=30)
    assert ok.ok and failed.error is not None  # the caller still gets the whole envelope
    assert failed.error.kind == "tool_error" and failed.error.name == "TypeError"
    assert failed.error.stack and failed.metadata["attempts"] == 1

    def task(call_id: str, state: str) -> dict[str, Any] | None:
        found = json.loads(get(f"{base}/api/tasks", auth)).get(call_id)
        return found if found and found["state"] == state else None

    assert wait_until(lambda: task(ok.id, "SUCCESS") is not None, 20)
    assert wait_until(lambda: task(failed.id, "FAILURE") is not None, 20)
    succeeded, failure = task(ok.id, "SUCCESS"), task(failed.id, "FAILURE")
    assert succeeded is not None and succeeded["name"] == "toolq:echo"
    assert failure is not None and failure["name"] == "toolq:throws"
    assert "tool_error" in failure["exception"] and "bad things happened" in failure["exception"]
    named = json.loads(get(f"{base}/api/tasks?taskname=toolq:throws", auth))
    assert failed.id in named and ok.id not in named


def test_flower_shows_a_chunk_as_one_task_with_its_tally(
    client: ToolClient, worker: WorkerProcess, flower: tuple[str, str]
) -> None:
    base, auth = flower

    def worker_listed() -> bool:
        return worker.hostname in json.loads(get(f"{base}/api/workers?refresh=1", auth))

    assert wait_until(worker_listed, 20)
    calls = client.enqueue_many("echo", [{"n": n} for n in range(5)], chunk_size=5)
    assert all(r.ok for r in client.gather(calls, wait=30))

    def chunk_task() -> dict[str, Any] | None:
        tasks = json.loads(get(f"{base}/api/tasks?taskname=toolq:echo", auth))
        found = [t for t in tasks.values() if calls[0].id in (t.get("args") or "")]
        return found[0] if found and found[0]["state"] == "SUCCESS" else None

    assert wait_until(lambda: chunk_task() is not None, 20)
    task = chunk_task()
    assert task is not None and "5 calls" in task["args"]
    assert "5 calls: 5 succeeded, 0 failed" in str(task["result"])


def test_task_events_flow_only_once_a_monitor_asks(
    client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    import redis

    worker = start_worker()
    queue = next(a.split("=", 1)[1] for a in worker.argv if a.startswith("--queues="))
    pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    # Pub/sub channels are the server's, not a database's: kombu prefixes them with the
    # database ("/13.celeryev/task.multi"), and another test's worker may share this one.
    db = urlsplit(redis_url).path.strip("/") or "0"
    pubsub.psubscribe(f"/{db}.celeryev/*")

    def ours(message: dict[str, Any]) -> bool:
        envelope = json.loads(message["data"])
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        events = json.loads(body)
        events = events if isinstance(events, list) else [events]
        return any(event.get("hostname") == worker.hostname for event in events)

    def channels_during_a_call() -> set[str]:
        while pubsub.get_message(timeout=0.05) is not None:
            pass  # what came before
        assert client.run("echo", {}, queue=queue, wait=30).ok
        seen, deadline = set(), time.monotonic() + 1.0
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message is not None and ours(message):
                seen.add(message["channel"].decode().rsplit("celeryev/", 1)[1])
        return seen

    try:
        assert not {c for c in channels_during_a_call() if c.startswith("task.")}
        client.app.control.enable_events(destination=[worker.hostname])  # what Flower does
        assert wait_until(lambda: any(c.startswith("task.") for c in channels_during_a_call()), 10)
    finally:
        pubsub.close()


def test_flower_refuses_a_public_address_without_auth(redis_url: str) -> None:
    proc = toolq(redis_url, "flower", "--address=0.0.0.0")
    assert proc.returncode == 2 and "--basic-auth" in proc.stderr


# -- metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_metrics_are_scraped_after_calls(
    client: ToolClient, start_worker: StartWorker, pool: str
) -> None:
    port = free_port()
    worker = start_worker(
        pool=pool,
        concurrency=2,
        env={
            "TOOLQ_PERFORMANCE__ENABLE_METRICS": "true",
            "TOOLQ_PERFORMANCE__METRICS_PORT": str(port),
        },
    )
    queue = queue_of(worker)
    assert client.run("echo", {"a": 1}, queue=queue, wait=30).ok
    assert client.run("throws", queue=queue, wait=30).error is not None
    assert client.run("sleep", {"ms": 5000}, queue=queue, wait=30).error is not None
    text = get(f"http://127.0.0.1:{port}/metrics")
    for line in (
        'compozy_runtime_tool_execute_seconds_count{outcome="success",tool_id="echo"} 1.0',
        'compozy_runtime_tool_execute_seconds_count{outcome="timeout",tool_id="sleep"} 1.0',
        'compozy_runtime_tool_errors_total{error_kind="tool_error",tool_id="throws"} 1.0',
        'compozy_runtime_tool_timeouts_total{tool_id="sleep"} 1.0',
        'compozy_runtime_tool_output_bytes_count{tool_id="echo"} 1.0',
        'toolq_queue_wait_seconds_count{tool_id="echo"} 1.0',
        'toolq_dead_letters_total{tool_id="throws"} 1.0',
    ):
        assert line in text, line
    # warm mode (the default) keeps Bun alive between calls; the timed-out one was ended
    assert (
        'compozy_runtime_bun_process_exits_total{code="",signal="SIGTERM",status="error"} 1.0'
        in text
    )
    running = [ln for ln in text.splitlines() if ln.startswith("toolq_tools_running")]
    assert running and all(ln.rstrip().endswith(" 0.0") for ln in running)


# -- scaling out and routing ---------------------------------------------------------------


def test_two_workers_share_one_queue_and_one_breaker(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path, redis_url: str
) -> None:
    queue = "shared-q"
    first = start_worker(queues=[queue], hostname="alpha@host-a", concurrency=2)
    second = start_worker(queues=[queue], hostname="beta@host-b", concurrency=2)
    results = client.map("sleep", [{"ms": 300}] * 12, queue=queue, wait=60)
    assert {r.metadata["worker"] for r in results} == {first.hostname, second.hostname}

    assert toolq(redis_url, "breakers", "reset", "breaker_target").returncode == 0
    counter = tmp_path / "runs"
    for _ in range(3):
        client.run(
            "breaker_target",
            {"counter": str(counter), "fail": True},
            queue=queue,
            retry=False,
            wait=30,
        )
    refused = client.map(
        "breaker_target", [{"counter": str(counter)}] * 6, queue=queue, retry=False, wait=30
    )
    assert {r.error.kind for r in refused if r.error} == {"circuit_open"}
    assert len(counter.read_text().split()) == 3
    assert toolq(redis_url, "breakers", "reset", "breaker_target").returncode == 0


def test_tools_are_routed_to_their_queue(start_worker: StartWorker, redis_url: str) -> None:
    routing = '{"heavy-q": ["sleep"]}'
    heavy = start_worker(queues=["heavy-q"], env={"TOOLQ_QUEUES": routing})
    light = start_worker(queues=["light-q"], env={"TOOLQ_QUEUES": routing})
    settings = load_settings(
        TOOLS_CONFIG,
        environ={"TOOLQ_QUEUES": routing},
        overrides={"redis_url": redis_url, "queue": "light-q"},
    )
    assert settings.queue_for("sleep") == "heavy-q" and settings.queue_for("echo") == "light-q"
    with ToolClient(settings) as routed:
        assert routed.run("sleep", {"ms": 10}, wait=30).metadata["worker"] == heavy.hostname
        assert routed.run("echo", {}, wait=30).metadata["worker"] == light.hostname


def test_a_worker_consumes_every_configured_queue_by_default(
    client: ToolClient, redis_url: str
) -> None:
    env = {"TOOLQ_QUEUES": '{"extra-q": ["sleep"]}', "TOOLQ_QUEUE": "main-q"}
    with WorkerProcess(config=TOOLS_CONFIG, redis_url=redis_url, env=env) as worker:
        worker.start(client.app)
        consumed = client.app.control.inspect(destination=[worker.hostname]).active_queues()
        assert {q["name"] for q in consumed[worker.hostname]} == {"main-q", "extra-q"}


def test_status_reports_queues_workers_breakers_and_dead_letters(
    worker: WorkerProcess, redis_url: str
) -> None:
    proc = toolq(redis_url, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["project"] == "toolq-test-tools"  # the project file's name
    assert any(q["name"] == "toolq-test-tools" and q["length"] >= 0 for q in report["queues"])
    node = next(w for w in report["workers"] if w["name"] == worker.hostname)
    assert node["queues"] == ["toolq-test-tools"]
    assert node["running"] >= 0 and node["reserved"] >= 0
    assert isinstance(report["dead_letters"], int)
    table = toolq(redis_url, "status")
    assert table.returncode == 0 and worker.hostname in table.stdout
    assert "project: toolq-test-tools" in table.stdout


def test_sentinel_urls_work_for_broker_backend_and_breakers(tmp_path: Path) -> None:
    binary = redis_server_binary()
    assert binary is not None
    redis_port, sentinel_port = free_port(), free_port()
    (tmp_path / "sentinel.conf").write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor toolq-master 127.0.0.1 {redis_port} 1\n"
    )
    servers = [
        subprocess.Popen(
            [
                binary,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [binary, str(tmp_path / "sentinel.conf"), "--sentinel"], stdout=subprocess.DEVNULL
        ),
    ]
    try:
        url = f"sentinel://127.0.0.1:{sentinel_port}/0"
        env = {"TOOLQ_REDIS_SENTINEL_MASTER": "toolq-master"}
        settings = load_settings(TOOLS_CONFIG, environ=env, overrides={"redis_url": url})

        def both_answer() -> bool:
            try:
                with redis.Redis(port=sentinel_port, socket_timeout=0.5) as sentinel:
                    master = sentinel.sentinel_get_master_addr_by_name("toolq-master")
            except redis.RedisError:
                return False
            return bool(master) and answers(f"redis://127.0.0.1:{redis_port}/0", 0.5)

        assert wait_until(both_answer, 20)
        with (
            ToolClient(settings) as sentinel_client,
            WorkerProcess(config=TOOLS_CONFIG, redis_url=url, env=env) as worker,
        ):
            worker.start(sentinel_client.app)
            assert sentinel_client.run("echo", {"via": "sentinel"}, wait=30).ok
            check_a_closed_client_leaves_no_socket_open(settings)  # the sentinels' too
            status = toolq(url, "status", "--json", env=env)
            assert status.returncode == 0, status.stderr
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)


# -- deployment and load -------------------------------------------------------------------


def test_docker_compose_file_wires_services_to_real_commands() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "flower", "producer"} <= set(services)
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "noeviction" in redis_command
    # Redis always has a password, never on a command line (ps shows those)
    assert "requirepass" in redis_command and "$$REDIS_PASSWORD" in redis_command
    required = "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == required
    for name in ("worker", "flower", "producer"):
        service = services[name]
        command = service["command"]
        assert command[0] == "toolq", name
        help_text = subprocess.run(
            [sys.executable, "-m", "toolq", command[1], "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for arg in command[2:]:
            if arg.startswith("--"):
                assert arg.split("=")[0] in help_text, (name, arg)
        assert service["environment"]["TOOLQ_REDIS_URL"] == f"redis://:{required}@redis:6379/0"
        assert "redis" in service["depends_on"]
        assert service.get("build") == "." or service.get("image")
    assert "deploy" not in services["worker"] or services["worker"]["deploy"].get("replicas")
    # sealing and signing on in the shipped deployment, secrets from files only
    for name in ("worker", "producer"):
        service = services[name]
        assert service["environment"]["TOOLQ_SECRET_KEY_FILE"] == "/run/secrets/toolq_secret_key"
        assert "toolq_secret_key" in service["secrets"], name
    assert "flower_auth" in services["flower"]["secrets"]
    assert not any("--basic-auth=" in arg for arg in services["flower"]["command"])
    assert set(compose["secrets"]) == {"toolq_secret_key", "flower_auth"}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "npm ci" in dockerfile and "pip install" in dockerfile


def test_loadtest_report_is_consistent(worker: WorkerProcess, redis_url: str) -> None:
    proc = toolq(
        redis_url,
        "loadtest",
        "--tool",
        "echo",
        "--input",
        '{"n": 1}',
        "--rps",
        "20",
        "--duration",
        "2s",
        "--concurrency",
        "8",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["total_requests"] == 40
    assert report["succeeded"] + report["failed"] == report["total_requests"]
    assert report["success_rate"] == report["succeeded"] / report["total_requests"]
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert report["avg_ms"] <= report["max_ms"]
    assert report["throughput_rps"] == pytest.approx(40 / report["elapsed_s"])
