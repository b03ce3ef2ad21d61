"""Operator commands (issue 31): against a Redis that is away, one line, exit 2, at once
(`toolq status` exited 1 with a 150-line kombu traceback on a refused connection; `dlq
list` and `breakers` said "cannot reach Redis" only after ~10 s of reconnect backoff);
`toolq status` counts calls as well as messages (a chunk is one message, many calls).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
import redis

from tests.test_operations import free_port, toolq
from toolq import ToolClient
from toolq.cli.devredis import RedisServer
from toolq.config.celery_app import queue_lists

COMMANDS = [["status"], ["dlq", "list"], ["breakers"]]
IDS = ["status", "dlq-list", "breakers"]


def assert_one_line_exit_2(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("toolq: cannot reach Redis: "), lines[:5]


class ClosingServer:
    """Accepts every connection and closes it at once, counting them: a Redis that is
    there and not answering, which a client with reconnect backoff tries again and again."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def closing_server() -> Iterator[ClosingServer]:
    server = ClosingServer()
    yield server
    server.close()


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_on_a_refused_connection_one_line_exit_2_without_reconnecting(
    command: list[str], closing_server: ClosingServer
) -> None:
    assert_one_line_exit_2(toolq(f"redis://127.0.0.1:{free_port()}/0", *command))
    # Tried once, not for ~10 s of backoff (nine connections before the fix).
    assert_one_line_exit_2(toolq(closing_server.url, *command))
    assert closing_server.connections == 1


def test_on_a_frozen_redis_one_line_exit_2_after_one_socket_timeout() -> None:
    server = RedisServer().start()
    assert server.proc is not None
    try:
        os.kill(server.proc.pid, signal.SIGSTOP)
        for command in COMMANDS:
            proc = toolq(server.url, *command, env={"TOOLQ_REDIS_SOCKET_TIMEOUT": "1s"})
            assert_one_line_exit_2(proc)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.close()


def test_status_counts_the_calls_in_chunks_as_well_as_messages(
    client: ToolClient, redis_url: str
) -> None:
    queue = "toolq-test-full"  # listed in the test project (its cap: 3 messages); never read
    store = redis.Redis.from_url(redis_url)
    try:
        store.delete(*queue_lists(queue))
        client.enqueue_many("echo", [{"n": n} for n in range(95)], queue=queue, chunk_size=48)
        client.enqueue("echo", {}, queue=queue, priority=5)  # another priority's list
        proc = toolq(redis_url, "status", "--json")
        assert proc.returncode == 0, proc.stderr
        [shown] = [q for q in json.loads(proc.stdout)["queues"] if q["name"] == queue]
        assert (shown["length"], shown["calls"], shown["cap"]) == (3, 96, 3)
        table = toolq(redis_url, "status").stdout
        assert "calls waiting" in table
        assert [line.split() for line in table.splitlines() if line.startswith(queue)] == [
            [queue, "3", "96", "3"]
        ]
    finally:
        store.delete(*queue_lists(queue))
        store.close()
