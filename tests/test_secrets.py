"""Secrets end to end: sealed env through real Redis, Celery workers and Bun; a scan of
every key in the test's Redis database for the env value, in plain and base64 forms;
redaction of what tools throw and print; dead-letter replay of a sealed env."""

from __future__ import annotations

import base64
import hashlib
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
from toolq.config.loader import load_settings
from toolq.producers.call import ToolCall
from toolq.producers.client import ToolClient

KEY = Fernet.generate_key().decode()

TEST_KEYS = load_settings(TOOLS_CONFIG, environ={}).keys
"""The test tool project's own keys (its name namespaces them, kombu's too)."""


@pytest.fixture
def sealed_client(redis_url: str) -> Iterator[ToolClient]:
    """A producer with the secret key."""
    settings = load_settings(
        TOOLS_CONFIG, environ={"TOOLQ_SECRET_KEY": KEY}, overrides={"redis_url": redis_url}
    )
    with ToolClient(settings) as client:
        yield client


def redis_contents(url: str) -> bytes:
    """Every key and every value of every key in the database, as one blob."""
    client = redis.Redis.from_url(url)
    chunks: list[bytes] = []
    for key in client.scan_iter(count=1000):
        chunks.append(key)
        kind = client.type(key)
        if kind == b"string":
            chunks.append(client.get(key) or b"")
        elif kind == b"list":
            chunks += client.lrange(key, 0, -1)
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                chunks += [field, value]
        elif kind == b"zset":
            chunks += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"set":
            chunks += list(client.smembers(key))
    client.close()
    return b"\n".join(chunks)


def forms(value: str) -> list[bytes]:
    """The value as Redis may hold it: plain, or inside base64 at any of the three byte
    alignments (kombu stores message bodies base64-encoded), both alphabets."""
    raw = value.encode()
    found = [raw]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        first = -(-8 * shift // 6)  # the first character made only of the value's bits
        last = 8 * (shift + len(raw)) // 6  # one past the last such character
        stable = encoded[first:last]
        found += [stable, stable.replace(b"+", b"-").replace(b"/", b"_")]
    return found


def holds(blob: bytes, value: str) -> bool:
    return any(form in blob for form in forms(value))


def test_the_scan_finds_an_env_value_without_a_key(
    client: ToolClient, start_worker: StartWorker, redis_url: str
) -> None:
    """The control: the same scan sees a plain env (today's behaviour without a key)."""
    secret = f"plain-{uuid.uuid4().hex}"
    queue = f"q-{uuid.uuid4().hex[:8]}"
    call = client.enqueue("hold_env", {"ms": 10}, {"API_KEY": secret}, queue=queue)
    assert holds(redis_contents(redis_url), secret)  # in the queue, base64 in the body
    start_worker(queues=[queue])
    assert call.result(timeout=60).result == {"has_key": True}


def test_with_a_key_no_env_value_is_anywhere_in_redis(
    sealed_client: ToolClient, start_worker: StartWorker, redis_url: str, tmp_path: Path
) -> None:
    secret = f"sk-{uuid.uuid4().hex}"
    marker = f"input-marker-{uuid.uuid4().hex}"  # not secret: proves the scan sees messages
    env = {"API_KEY": secret}
    queue = f"q-{uuid.uuid4().hex[:8]}"

    def enqueue(tool_id: str, payload: dict[str, Any], **options: Any) -> ToolCall:
        return sealed_client.enqueue(
            tool_id, {**payload, "marker_text": marker}, options.pop("env", env), queue=queue
        )

    calls = {
        "hold": enqueue("hold_env", {"ms": 2500}),
        "thrown": enqueue("throw_env", {}),  # retried once, then dead-lettered
        "printed": enqueue("print_env", {}),  # its stderr goes to the worker log
        "crashed": enqueue("print_secret", {}, env={"API_TOKEN": secret}),
        "digest": enqueue("env_digest", {"marker": str(tmp_path / "once")}),
    }
    queued = redis_contents(redis_url)
    assert holds(queued, marker) and not holds(queued, secret)

    worker = start_worker(queues=[queue], env={"TOOLQ_SECRET_KEY": KEY})
    scans = 0
    in_flight = redis.Redis.from_url(redis_url)
    while not calls["hold"].ready():  # while calls run: the unacked hash, retries' messages
        unacked = in_flight.hlen(f"{TEST_KEYS.prefix}unacked")  # kombu: running messages
        blob = redis_contents(redis_url)
        assert not holds(blob, secret)
        scans += unacked > 0 and holds(blob, marker)
        time.sleep(0.1)
    assert scans > 0  # the scan did see calls in flight
    results = {name: call.result(timeout=60) for name, call in calls.items()}

    assert results["hold"].result == {"has_key": True}  # the worker opened the env
    digest = results["digest"].result
    assert digest is None  # failed the first time: dead-lettered (replayed below)
    thrown = results["thrown"].error
    assert thrown is not None and thrown.message == "***" and thrown.stack is not None
    assert results["thrown"].metadata["attempt_history"][0]["message"] == "***"
    crashed = results["crashed"].error
    assert crashed is not None and "the secret is ***" in (crashed.stderr or "")

    blob = redis_contents(redis_url)
    assert not holds(blob, secret)
    assert b"env_sealed" in blob  # the dead letters hold the sealed env
    log = worker.output()
    assert "using ***" in log and secret not in log

    # A dead letter replays with its sealed env passed on unopened; the CLI needs the key
    # only to sign the call (a worker with a key runs signed calls only: "Signed calls").
    cli_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TOOLQ_")},
        "TOOLQ_REDIS_URL": redis_url,
        "TOOLQ_CONFIG": str(TOOLS_CONFIG),
        "TOOLQ_SECRET_KEY": KEY,
    }
    replayed = subprocess.run(
        [sys.executable, "-m", "toolq", "dlq", "replay", calls["digest"].id],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
    )
    assert replayed.returncode == 0, replayed.stderr
    new_id = replayed.stdout.strip().split(" -> ")[1]
    again = sealed_client.call(new_id).result(timeout=60)
    assert again.result == {"sha256": hashlib.sha256(secret.encode()).hexdigest()}
    assert not holds(redis_contents(redis_url), secret)


def test_a_worker_with_a_key_refuses_plain_env(
    client: ToolClient,
    sealed_client: ToolClient,
    start_worker: StartWorker,
    redis_url: str,
) -> None:
    secret = f"plain-{uuid.uuid4().hex}"
    worker = start_worker(env={"TOOLQ_SECRET_KEY": KEY})
    queue = worker.argv[-1].split("=", 1)[1]
    # a producer without the key: refused before its env is read (it is not signed either)
    refused = client.enqueue("hold_env", {"ms": 10}, {"API_KEY": secret}, queue=queue)
    error = refused.result(timeout=60).error
    assert error is not None and error.kind == "invalid_input"
    assert "unsigned call refused" in error.message and "TOOLQ_SECRET_KEY" in error.message
    # an empty env needs no sealing
    fine = sealed_client.enqueue("hold_env", {"ms": 10}, queue=queue).result(timeout=60)
    assert fine.result == {"has_key": False}
    # the refused call's env is dead-lettered sealed, not as it came
    entry = redis.Redis.from_url(redis_url).hget(TEST_KEYS.dead_letters, refused.id)
    assert entry is not None and not holds(entry, secret)
    assert "env" not in json.loads(entry) and json.loads(entry)["env_sealed"]


@pytest.mark.parametrize("mode", ["warm", "spawn"])
def test_what_a_tool_throws_or_prints_is_redacted_in_the_envelope(
    client: ToolClient, start_worker: StartWorker, mode: str
) -> None:
    worker = start_worker(env={"TOOLQ_RUNTIME__MODE": mode})
    queue = worker.argv[-1].split("=", 1)[1]
    for value in ("a-long-secret-value", "k9", "7"):
        result = client.run(
            "throw_env", {}, {"API_KEY": value}, queue=queue, max_attempts=1, wait=60
        )
        assert result.error is not None
        assert result.error.message == "***", value
        assert result.error.stack is not None and "Error: ***" in result.error.stack
    printed = client.run("print_env", {}, {"API_KEY": "k9"}, queue=queue, wait=60)
    assert printed.result == {"ok": True}
    assert wait_until(lambda: "using ***" in worker.output(), 5)
    assert "using k9" not in worker.output()


def test_the_key_never_reaches_a_tool_granted_the_whole_environment(
    sealed_client: ToolClient, start_worker: StartWorker
) -> None:
    worker = start_worker(
        env={
            "TOOLQ_SECRET_KEY": KEY,
            "TOOLQ_RUNTIME__PERMISSIONS": '["--allow-read", "--allow-write", "--allow-env"]',
            "WORKER_ONLY_SETTING": "visible",  # proves the tool does get the worker's env
        }
    )
    queue = worker.argv[-1].split("=", 1)[1]
    keys_wanted = {"keys": ["TOOLQ_SECRET_KEY", "WORKER_ONLY_SETTING"]}
    seen = sealed_client.run("env", keys_wanted, queue=queue, wait=60).result
    assert seen == {"env": {"TOOLQ_SECRET_KEY": None, "WORKER_ONLY_SETTING": "visible"}}


def test_the_cli_refuses_a_malformed_key_in_one_line_without_showing_it() -> None:
    bogus = "almost-a-key-but-not-quite"
    env = {**os.environ, "TOOLQ_SECRET_KEY": bogus, "TOOLQ_CONFIG": str(TOOLS_CONFIG)}
    proc = subprocess.run(
        [sys.executable, "-m", "toolq", "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("toolq: secret_key: key 1 of 1 is not a Fernet key")
    assert bogus not in proc.stderr + proc.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "toolq", "config"],
        capture_output=True,
        text=True,
        env={**env, "TOOLQ_SECRET_KEY": KEY},
        timeout=60,
    )
    assert shown.returncode == 0 and KEY not in shown.stdout
