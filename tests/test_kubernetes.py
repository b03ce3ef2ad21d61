"""What the Kubernetes deployment relies on, against real workers, Redis and Bun: the
probe command on the worker's heartbeat file (a wedged worker is detected), the
exporter's backlog (calls, not messages, over priorities, chunks and flow-control
waiters) and a SIGTERM drain inside the grace period the manifests give."""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOOLS, TOOLS_CONFIG, StartWorker, wait_until
from toolq.cli.backlog import count_list, queue_backlog
from toolq.config.celery_app import queue_lists
from toolq.config.loader import load_settings
from toolq.health import check, drain_budget_s
from toolq.producers.client import ToolClient


def toolq(*args: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOOLQ_CONFIG": str(TOOLS_CONFIG)}
    if redis_url is not None:
        env["TOOLQ_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "toolq", *args], capture_output=True, text=True, env=env, timeout=60
    )


# -- probes ----------------------------------------------------------------------------------


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A directory outside pytest's basetemp (tests/tools/.tmp, which a pytest run
    started meanwhile in the same checkout wipes)."""
    with tempfile.TemporaryDirectory(prefix="toolq-run-") as name:
        yield Path(name)


def test_health_probe_detects_a_wedged_worker(
    client: ToolClient, redis_url: str, run_dir: Path
) -> None:
    health_file = run_dir / "run" / "health"
    assert check(health_file) is not None  # no file yet: not live

    from toolq.workers.process import WorkerProcess

    process = WorkerProcess(
        config=TOOLS_CONFIG, redis_url=redis_url, queues=[f"q-{uuid.uuid4().hex[:8]}"]
    )
    process.argv.append(f"--health-file={health_file}")
    try:
        process.start(client.app)
        assert wait_until(lambda: check(health_file, ready=True) is None, 20), (
            check(health_file),
            process.output()[-2000:],
        )
        ready = toolq("health", f"--file={health_file}", "--ready")
        assert ready.returncode == 0, ready.stderr
        os.kill(process.pid, signal.SIGSTOP)  # wedged: alive, its loop does nothing
        try:
            # Celery beats every 2 s: a 4 s window fails once it stopped beating
            assert wait_until(lambda: check(health_file, max_age_s=4) is not None, 20)
            stale = toolq("health", f"--file={health_file}", "--max-age=4s")
            assert stale.returncode == 1
            assert "last heartbeat" in stale.stderr and "wedged" in stale.stderr, stale.stderr
        finally:
            os.kill(process.pid, signal.SIGCONT)
        assert wait_until(lambda: check(health_file, max_age_s=4) is None, 30), (
            check(health_file, max_age_s=4),
            process.output()[-3000:],
        )
        # Told to stop: not ready any more, still live while it drains
        process.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert wait_until(lambda: check(health_file, ready=True) is not None, 20)
        assert "stopping" in (check(health_file, ready=True) or "")
        assert check(health_file, max_age_s=4) is None  # live while it drains
        process.proc.wait(timeout=30)  # type: ignore[union-attr]
    finally:
        process.close()


# -- the seccomp profile ---------------------------------------------------------------------

SECCOMP = Path(__file__).resolve().parent.parent / "deploy" / "seccomp" / "toolq-bwrap.json"
SECCOMP_EXEC = Path(__file__).resolve().parent / "seccomp_exec.py"


def _under_seccomp(process: Any, profile: Path) -> None:
    process.argv[:0] = [sys.executable, str(SECCOMP_EXEC), str(profile), "--"]


@pytest.mark.skipif(
    ctypes.util.find_library("seccomp") is None, reason="needs libseccomp to load the profile"
)
@pytest.mark.parametrize("user", ["root", "non-root"])
def test_a_worker_runs_sandboxed_tools_under_the_shipped_seccomp_profile(
    client: ToolClient, redis_url: str, tmp_path: Path, user: str
) -> None:
    """The pod's seccomp profile, loaded as a runtime loads it, lets the production
    profile's sandbox start and run a call (Python, Celery, Bun and bubblewrap under it),
    as root and as an ordinary user (the pods' uid: bubblewrap then makes an
    unprivileged user namespace); the runtimes' default alone (the profile without
    bubblewrap's rule) does not."""
    from tests.test_hostile import WORKER_UID, as_worker_user
    from toolq.workers.process import WorkerProcess

    env = {"TOOLQ_RUNTIME__SANDBOX": "required"}
    home = Path(f"/home/toolq-k8s-{uuid.uuid4().hex[:8]}")  # the pods' HOME: /home/toolq
    if user == "non-root":
        if os.geteuid() != 0:
            pytest.skip("needs root to start a worker as another user")
        home.mkdir(mode=0o700)
        os.chown(home, WORKER_UID, WORKER_UID)
        env["HOME"] = str(home)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(config=TOOLS_CONFIG, redis_url=redis_url, queues=[queue], env=env)
    _under_seccomp(worker, SECCOMP)
    if user == "non-root":
        worker.argv[:0] = as_worker_user()
    try:
        worker.start(client.app, timeout_s=60)
        result = client.run("echo", {"under": "seccomp"}, queue=queue, wait=60)
        assert result.ok, result.error
        assert result.result == {"echo": {"under": "seccomp"}}
        assert result.metadata.get("sandbox") == "bwrap", result.metadata
    finally:
        worker.close()

    profile = json.loads(SECCOMP.read_text())
    profile["syscalls"] = [
        r for r in profile["syscalls"] if "bubblewrap" not in r.get("comment", "")
    ]
    default_only = tmp_path / "default-only.json"
    default_only.write_text(json.dumps(profile))
    refused = WorkerProcess(config=TOOLS_CONFIG, redis_url=redis_url, queues=[queue], env=env)
    _under_seccomp(refused, default_only)
    if user == "non-root":
        default_only.chmod(0o644)
        refused.argv[:0] = as_worker_user()
    try:
        with pytest.raises(RuntimeError, match="exited with code 2"):
            refused.start(client.app, timeout_s=60)
        assert "cannot be sandboxed here" in refused.output()
    finally:
        refused.close()
        shutil.rmtree(home, ignore_errors=True)


# -- the exporter ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def backlog_settings(redis_url: str) -> Iterator[Any]:
    """The test project on a queue of this test's own, which no worker consumes."""
    queue = f"q-backlog-{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        TOOLS_CONFIG, environ={}, overrides={"redis_url": redis_url, "queue": queue}
    )
    yield settings
    plain = redis.Redis.from_url(redis_url)
    plain.delete(*queue_lists(queue))
    plain.close()


def test_exporter_counts_calls_across_priorities_chunks_and_waiters(
    backlog_settings: Any, redis_url: str
) -> None:
    settings = backlog_settings
    queue = settings.queue
    with ToolClient(settings) as producer:
        first_from = time.time()
        producer.enqueue("echo", {"n": 0})  # the oldest call: priority 0, alone
        first_by = time.time()
        for _ in range(2):
            producer.enqueue("echo", {"n": 1})
        for _ in range(2):
            producer.enqueue("echo", {"n": 2}, priority=9)
        producer.enqueue_many("echo", [{"n": i} for i in range(40)], chunk_size=40, priority=5)
        producer.enqueue_many("echo", [{"n": i} for i in range(250)], chunk_size=100)
    # Calls held back by flow control are in no list: a worker holds each until its turn.
    plain = redis.Redis.from_url(redis_url)
    far = time.time() + 3600
    keys = settings.keys
    plain.zadd(keys.slot_waiting_seen("capped"), {"w1": far, "w2": far, "gone": 1})
    plain.zadd(keys.rate_waiting("rated"), {"r1": far})
    try:
        # 3 + 250 calls at priority 0 in 3 + 3 messages (100, 100, 50 calls)
        found = queue_backlog(plain, settings, queue)
        assert found.calls[0] == 253 and found.messages[0] == 6
        assert found.calls[9] == 2 and found.messages[9] == 2
        assert found.calls[5] == 40 and found.messages[5] == 1
        assert sum(found.calls.values()) == 295 and found.exact
        waiting = {key: n for key, n in found.waiting.items() if n}
        assert waiting == {("capped", "slot"): 2, ("rated", "rate"): 1}
        assert found.waiting[("capped_one", "slot")] == 0  # every capped tool has a series
        assert found.oldest_enqueued_at is not None
        assert first_from <= found.oldest_enqueued_at <= first_by
        # read in windows smaller than the list, and estimated past max_scan
        lists = queue_lists(queue)
        assert count_list(plain, lists[9], window=2) == (6, 253, True)
        messages, calls, exact = count_list(plain, lists[9], max_scan=3, window=2)
        assert (messages, exact) == (6, False) and calls > 6

        port = _free_port()
        exporter = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "toolq",
                "exporter",
                f"--port={port}",
                f"--queues={queue}",
                f"--config={TOOLS_CONFIG}",
            ],
            env={**os.environ, "TOOLQ_REDIS_URL": redis_url, "TOOLQ_QUEUE": queue},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            text = ""

            def scraped() -> bool:
                nonlocal text
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        text = r.read().decode()
                    return True
                except OSError:
                    return exporter.poll() is not None

            scraped_from = time.time()
            assert wait_until(scraped, 30) and exporter.poll() is None, exporter.stdout
            scraped_by = time.time()
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

            def value(name: str, **labels: str) -> float:
                return samples[(name, tuple(sorted(labels.items())))]

            assert value("toolq_backlog_calls", queue=queue, priority="0") == 253
            assert value("toolq_backlog_calls", queue=queue, priority="5") == 40
            assert value("toolq_backlog_calls", queue=queue, priority="9") == 2
            assert value("toolq_backlog_messages", queue=queue, priority="0") == 6
            assert sum(v for (n, _), v in samples.items() if n == "toolq_backlog_calls") == 295
            assert (
                value("toolq_flow_waiting_calls", queue=queue, tool_id="capped", reason="slot") == 2
            )
            assert (
                value("toolq_flow_waiting_calls", queue=queue, tool_id="rated", reason="rate") == 1
            )
            assert value("toolq_backlog_exact", queue=queue) == 1
            # the queue's age: since the oldest call's first enqueue (same host's clock)
            age = value("toolq_backlog_oldest_age_seconds", queue=queue)
            assert scraped_from - first_by <= age <= scraped_by - first_from
            assert value("toolq_live_workers", queue=queue) == 0
            assert value("toolq_exporter_up") == 1
        finally:
            exporter.terminate()
            exporter.communicate(timeout=10)  # closes its pipe
    finally:
        plain.delete(keys.slot_waiting_seen("capped"), keys.rate_waiting("rated"))
        plain.close()


def test_the_exporter_says_when_it_cannot_read_redis_and_keeps_serving() -> None:
    from prometheus_client import generate_latest

    from toolq.cli.exporter import registry_for

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    settings = load_settings(TOOLS_CONFIG, environ={}, overrides={"redis_url": dead})
    registry, collector = registry_for(settings, min_interval_s=0)
    try:
        for _ in range(2):  # every scrape answers, and says so
            text = generate_latest(registry).decode()
            assert "toolq_exporter_up 0.0" in text and "toolq_backlog_calls{" not in text
    finally:
        collector.close()


# -- drain -----------------------------------------------------------------------------------


@pytest.fixture
def tool_dir() -> Iterator[Path]:
    """A directory the sandboxed test tools may write (inside their project), outside
    pytest's basetemp, which a pytest run started meanwhile in this checkout wipes."""
    path = TOOLS / f".tmp-k8s-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o1777)
    path.chmod(0o1777)  # the tools' uid 65534 writes here when the tests run as root
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_sigterm_drains_within_the_grace_period_and_hands_back_a_chunks_rest(
    start_worker: StartWorker, client: ToolClient, redis_url: str, tool_dir: Path
) -> None:
    """A scale-down's SIGTERM: the calls running finish, a chunk starts no more (its rest
    goes back on the queue for another worker), and the worker exits within the drain
    budget the manifests' terminationGracePeriodSeconds is derived from."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    worker = start_worker(queues=[queue], concurrency=2)
    markers = [tool_dir / f"m{i}" for i in range(6)]
    calls = client.enqueue_many(
        "marked_sleep",
        [{"marker": str(m), "ms": 4000} for m in markers],
        queue=queue,
        chunk_size=6,
    )
    assert wait_until(lambda: sum(m.exists() for m in markers) == 2, 30)
    budget_s = drain_budget_s(client.settings)
    started = time.monotonic()
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(timeout=budget_s + 30)
    assert time.monotonic() - started < budget_s, worker.output()[-3000:]
    assert worker.proc.returncode == 0, worker.output()[-3000:]
    # The calls running finished (two, unless the machine is slow enough for a round to
    # end before the signal); the ones not started are back on the queue.
    started = sum(m.exists() for m in markers)
    assert 2 <= started < len(markers), worker.output()[-3000:]
    finished = [call for call in calls if call.ready()]
    assert len(finished) == started and all(call.result().ok for call in finished)
    plain = redis.Redis.from_url(redis_url)
    try:
        waiting = sum(count_list(plain, name)[1] for name in queue_lists(queue))
    finally:
        plain.close()
    assert waiting == len(markers) - started, worker.output()[-3000:]
    start_worker(queues=[queue], concurrency=2)
    results = [call.result(timeout=60) for call in calls]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
