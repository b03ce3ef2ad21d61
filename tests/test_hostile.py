"""Issue 29: hostile tools and callers, round two. Each attack tried end to end, against a
real worker (real Redis, real Celery, real Bun in its sandbox), as the issue found it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tests.conftest import TOOLS, TOOLS_CONFIG, StartWorker, descendants, wait_until
from toolq.config.celery_app import RUN_TOOL_TASK
from toolq.config.loader import load_settings
from toolq.config.settings import TimeLimits
from toolq.errors import InvalidInput
from toolq.permissions import Permissions
from toolq.producers.client import ToolClient
from toolq.validation import MAX_JSON_DEPTH
from toolq.workers.process import WorkerProcess
from toolq.workers.runtime.base import Call
from toolq.workers.runtime.bun import WRAPPER
from toolq.workers.runtime.launch import Launcher
from toolq.workers.runtime.sandbox import make_sandbox
from toolq.workers.runtime.spawn import SpawnRuntime


def _zombies_below(pid: int) -> list[int]:
    found = []
    for child in descendants(pid):
        try:
            with open(f"/proc/{child}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    found.append(child)
        except OSError:
            continue
    return found


# -- 1. a result nested thousands of levels deep ----------------------------------------------


@pytest.mark.parametrize("tool_id", ["nest", "nest_spawn"])
def test_a_deep_result_is_invalid_output_never_retried_and_frees_its_process(
    client: ToolClient, start_worker: StartWorker, tool_id: str
) -> None:
    """Tool: {a:{a:…}} 5,000 levels made the worker's json.loads raise RecursionError: the
    call ended crashed (retried), a warm process was neither returned nor retired (after
    max_concurrent_tools such calls, no warm call ran again) and a spawned one was left a
    zombie. More deep calls than the pool holds, then an ordinary call on the same worker."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    worker = start_worker(queues=[queue])
    for _ in range(6):  # the pool holds 4 (max_concurrent_tools)
        deep = client.run(tool_id, {"depth": 5000}, queue=queue, wait=60)
        assert deep.error is not None and deep.error.kind == "invalid_output", deep
        assert f"deeper than {MAX_JSON_DEPTH} levels" in deep.error.message
        assert deep.metadata["attempts"] == 1  # never retried
    at_the_limit = client.run(tool_id, {"depth": MAX_JSON_DEPTH - 1}, queue=queue, wait=60)
    assert at_the_limit.ok, at_the_limit.error
    assert client.run("nest", {"depth": 3}, queue=queue, wait=60).ok  # warm serves on
    assert wait_until(lambda: not _zombies_below(worker.pid)), _zombies_below(worker.pid)


# -- 2. a worker that is not root: its user's files -------------------------------------------

WORKER_UID = 4242  # a uid no one else uses here, as a dedicated worker user would be


def _own(path: Path, mode: int) -> None:
    os.chown(path, WORKER_UID, WORKER_UID)
    path.chmod(mode)


@pytest.fixture
def worker_user_files() -> Iterator[dict[str, Path]]:
    """What a non-root worker's user owns: a home with its 0600 secret_key_file and an SSH
    key, and an application directory of its own under /opt."""
    if os.geteuid() != 0:
        pytest.skip("making a second user's files needs root (CI runs the suite as root)")
    tag = uuid.uuid4().hex[:8]
    home, app = Path(f"/home/toolq-it-{tag}"), Path(f"/opt/toolq-it-{tag}")
    for directory in (home, home / ".ssh", app):
        directory.mkdir(parents=True)
        _own(directory, 0o700)
    files = {"home": home, "key": home / "toolq.key", "ssh": home / ".ssh" / "id_ed25519"}
    files["app"] = app / "credentials"
    files["key"].write_text(Fernet.generate_key().decode())
    files["ssh"].write_text("PRIVATE SSH KEY")
    files["app"].write_text("APP CREDENTIALS")
    for name in ("key", "ssh", "app"):
        _own(files[name], 0o600)
    yield files
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(app, ignore_errors=True)


def as_worker_user() -> list[str]:
    """The command prefix that runs a program as WORKER_UID. This interpreter may live
    under root's 0700 home (pyenv): a mount namespace of the worker's own then shows
    it there, and nothing else of /root."""
    drop = ["setpriv", f"--reuid={WORKER_UID}", f"--regid={WORKER_UID}", "--clear-groups"]
    real = os.path.realpath(sys.executable)
    if not real.startswith("/root/"):
        return drop
    keep = "/root/" + real.split("/")[2]
    script = (
        f'd=$(mktemp -d) && mount --bind {keep} "$d" && mount -t tmpfs -o mode=755 none /root'
        f' && mkdir -p {keep} && mount --bind "$d" {keep} && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *drop]


def test_a_non_root_workers_tools_cannot_read_its_users_files(
    redis_url: str, worker_user_files: dict[str, Path]
) -> None:
    """Tool: with the worker running as an ordinary user, bwrap ran as that user and
    --allow-read let the tool read its 0600 secret_key_file (and ~/.ssh, everything the
    user owns). A real worker as uid 4242, its key in its home, a tool granted
    --allow-read (the test project's profile)."""
    files = worker_user_files
    settings = load_settings(
        TOOLS_CONFIG,
        environ={},
        overrides={"redis_url": redis_url, "secret_key_file": str(files["key"])},
    )
    queue = f"q-{uuid.uuid4().hex[:8]}"
    with (
        ToolClient(settings) as keyed,
        WorkerProcess(
            config=TOOLS_CONFIG,
            redis_url=redis_url,
            queues=[queue],
            env={"HOME": str(files["home"]), "TOOLQ_SECRET_KEY_FILE": str(files["key"])},
        ) as process,
    ):
        process.argv[:0] = as_worker_user()
        process.start(keyed.app)

        def read(path: Path | str) -> dict[str, Any]:
            result = keyed.run("probe", {"action": "read", "path": str(path)}, queue=queue, wait=60)
            assert result.result is not None, result.error
            return result.result

        status = keyed.run("self_status", queue=queue, wait=60).result
        assert status is not None and status["uid"].split()[0] == "65534"
        assert read("/etc/hostname")["ok"]  # --allow-read still reads the host
        secret = files["key"].read_text()
        for name in ("key", "ssh", "app"):
            seen = read(files[name])
            assert seen.get("text", "") not in (secret, "PRIVATE SSH KEY", "APP CREDENTIALS")
            assert seen.get("text", "") == "" or not seen["ok"], seen
        assert "tools run as this worker's uid 4242" in process.output()


# -- 6. host unix sockets under --allow-read --------------------------------------------------


class _SocketServer:
    """A unix socket that says 'hello' to whoever connects (a local database's stand-in)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o755, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        path.chmod(0o777)  # anyone may connect, as a database's socket lets them
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:  # open until the client closes: a peer gone at once reads as a reset
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.sendall(b"hello")
                    conn.recv(1)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.sock.close()
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()


@pytest.fixture
def host_sockets() -> Iterator[list[Path]]:
    tag = uuid.uuid4().hex[:8]
    servers = [
        _SocketServer(Path(f"/run/toolq-it-{tag}/db.sock")),
        _SocketServer(Path(f"/var/tmp/toolq-it-{tag}/db.sock")),
    ]
    yield [server.path for server in servers]
    for server in servers:
        server.close()


def test_allow_read_does_not_reach_host_unix_sockets(
    client: ToolClient, start_worker: StartWorker, host_sockets: list[Path]
) -> None:
    """Tool: the default --allow-read (the host's / read-only) reached a local MariaDB's
    and PostgreSQL's sockets under /run and got their handshakes: a read-only mount does
    not stop connect(). A socket under /run and one elsewhere (/var/tmp)."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    start_worker(queues=[queue])
    for path in host_sockets:
        result = client.run("probe", {"action": "unix", "path": str(path)}, queue=queue, wait=60)
        assert result.result is not None, result.error
        assert not result.result["ok"], (path, result.result)


def test_a_grant_that_names_a_socket_reaches_it(host_sockets: list[Path], bun: Path) -> None:
    """A socket stays reachable where a grant names its directory (`--allow-read=/run/x`)."""
    sandbox = make_sandbox("required", bun, WRAPPER, TOOLS)
    launcher = Launcher(bun, TOOLS / "entrypoint.ts", TOOLS, sandbox=sandbox)
    for path in host_sockets:
        call = Call(
            "probe",
            str(uuid.uuid4()),
            {"action": "unix", "path": str(path)},
            {},
            TimeLimits(10, 12),
            permissions=Permissions.parse([f"--allow-read={path.parent}"]),
        )
        outcome = SpawnRuntime(launcher).run(call)
        assert outcome.result == {"ok": True, "said": "hello"}, (outcome.error, outcome.stderr)


# -- 3. cancel ids --------------------------------------------------------------------------


def test_cancel_accepts_only_call_ids(client: ToolClient, redis_url: str, settings: Any) -> None:
    """Caller: `toolq cancel 'x*:y'` and 1 MiB ids were accepted; each wrote a result key,
    a day-long entry in the cancelled set (which every worker holds in memory) and a
    publish. Refused now, with nothing written."""
    from tests.test_worker import toolq

    before = client._redis.zcard(settings.keys.cancelled)
    proc = toolq(redis_url, "cancel", "x*:y")
    assert proc.returncode == 2 and "invalid call id 'x*:y'" in proc.stderr, proc.stderr
    for call_id in ("x" * 2**20, "A0B1C2D3-0000-4000-8000-000000000000", " " + str(uuid.uuid4())):
        with pytest.raises(InvalidInput, match="a call id is a UUID"):
            client.cancel(call_id)
    assert client._redis.zcard(settings.keys.cancelled) == before
    assert client.cancel(str(uuid.uuid4())) == "cancelled"  # a well-formed id is accepted
    assert client._redis.zcard(settings.keys.cancelled) == before + 1


# -- 4. a call's env: bounded, and redacted in linear time --------------------------------


def test_call_env_is_bounded_at_the_producer_and_the_worker(
    client: ToolClient, worker: WorkerProcess
) -> None:
    """Caller: a message with 20,000 env names was accepted; redacting 10,000 values out
    of a 3 MB error message then held the worker 136 s for a 115 ms tool (past the
    visibility timeout: redelivered). Refused at the producer, and at the worker for a
    message that bypassed it; the worker goes on serving."""
    many = {f"KEY_{i}": "v" for i in range(20_000)}
    large = {"BLOB": "x" * (64 * 1024)}
    for env, words in ((many, "20000 names, over the limit of 128"), (large, "65536 bytes")):
        with pytest.raises(InvalidInput, match=words):
            client.enqueue("echo", env=env)
        call_id = str(uuid.uuid4())
        client.app.send_task(RUN_TOOL_TASK, args=[{"tool_id": "echo", "env": env}], task_id=call_id)
        result = client.call(call_id).result(timeout=60)
        assert result.error is not None and result.error.kind == "invalid_input", result
        assert words in result.error.message
    at_the_cap = {f"KEY_{i}": f"value-{i}-{uuid.uuid4().hex}" for i in range(128)}
    thrown = client.run("throw_env", {"name": "KEY_127"}, env=at_the_cap, wait=60)
    assert thrown.error is not None and at_the_cap["KEY_127"] not in thrown.error.message
    assert "***" in thrown.error.message


# -- 5. idempotency keys are bound to the request ------------------------------------------


def test_an_idempotency_key_is_bound_to_its_tool_and_input(
    client: ToolClient, worker: WorkerProcess, redis_url: str
) -> None:
    """Caller: `run echo … --idempotency-key order-42`, then another tool with other input
    under the same key got the first call's result. Now: the same request gets the first
    call; another tool or other input is refused, naming the key."""
    from tests.test_worker import toolq

    key = f"order-{uuid.uuid4().hex[:8]}"
    first = client.run("echo", {"page": "<b>receipt</b>"}, idempotency_key=key, wait=60)
    assert first.ok
    again = client.run("echo", {"page": "<b>receipt</b>"}, idempotency_key=key, wait=60)
    assert again.id == first.id  # the same request: the first call, not run twice
    with pytest.raises(InvalidInput, match=f"'{key}' was first used for tool 'echo'"):
        client.enqueue("env", {"amount": 100}, env={"API_KEY": "k"}, idempotency_key=key)
    with pytest.raises(InvalidInput, match="other input or config"):
        client.enqueue("echo", {"page": "<b>refund</b>"}, idempotency_key=key)
    proc = toolq(redis_url, "run", "env", "--input", '{"amount": 100}', "--idempotency-key", key)
    assert proc.returncode == 2 and "use a new key" in proc.stderr, (proc.stdout, proc.stderr)


# -- 8. TOOLQ_SECRET_KEY stays in /proc/<worker>/environ -------------------------------------


def test_a_worker_given_its_key_in_the_environment_says_where_it_stays(redis_url: str) -> None:
    """Operator: a worker drops TOOLQ_SECRET_KEY from os.environ, but the kernel keeps the
    environment it started with in /proc/<pid>/environ. The worker says so and points at
    secret_key_file; one given the key in a file has no such copy."""
    key = Fernet.generate_key().decode()
    settings = load_settings(
        TOOLS_CONFIG, environ={}, overrides={"redis_url": redis_url, "secret_key": key}
    )
    with ToolClient(settings) as keyed:
        queue = f"q-{uuid.uuid4().hex[:8]}"
        process = WorkerProcess(
            config=TOOLS_CONFIG, redis_url=redis_url, queues=[queue], env={"TOOLQ_SECRET_KEY": key}
        )
        try:
            process.start(keyed.app)
            with open(f"/proc/{process.pid}/environ", "rb") as environ:
                assert f"TOOLQ_SECRET_KEY={key}".encode() in environ.read()  # the kernel's copy
            assert f"stays readable in /proc/{process.pid}/environ" in process.output()
            assert "prefer secret_key_file" in process.output()
        finally:
            process.close()


# -- 10. what a caller controls: a deployment can lock a definition's config and env ------

LOCKED_PROJECT = """
name: locked-desk-{tag}
runtime:
  type: bun
  entrypoint: ./entrypoint.ts
  permissions: [--allow-read]
max_attempts: 1
tools:
  - id: charge
    description: Calls a payment API with the worker's key
    config: {{base_url: "https://payments.example"}}
    env: {{PAYMENTS_KEY: "{{{{ .env.WORKER_PAYMENTS_KEY }}}}", REGION: eu}}
    lock_definition: true
  - id: charge_open
    description: The same, unlocked
    config: {{base_url: "https://payments.example"}}
    env: {{PAYMENTS_KEY: "{{{{ .env.WORKER_PAYMENTS_KEY }}}}"}}
"""
LOCKED_ENTRYPOINT = """
const charge = async (input: unknown, config: { base_url: string }) => ({
  would_send_key_to: config.base_url,
  region: process.env.REGION ?? null,
  has_key: Boolean(process.env.PAYMENTS_KEY),
});
export default { charge, charge_open: charge };
"""


@pytest.fixture
def locked_project() -> Iterator[Path]:
    """A project of its own outside pytest's basetemp (another run's start empties that)."""
    project = Path(tempfile.mkdtemp(prefix="toolq-locked-", dir="/var/tmp"))
    project.chmod(0o755)  # the tools' uid reads it
    (project / "compozy.yaml").write_text(LOCKED_PROJECT.format(tag=uuid.uuid4().hex[:8]))
    (project / "entrypoint.ts").write_text(LOCKED_ENTRYPOINT)
    yield project
    shutil.rmtree(project, ignore_errors=True)


def test_a_locked_definition_keeps_its_config_and_env_from_callers(
    locked_project: Path, redis_url: str
) -> None:
    """Caller: config= overrides a definition key by key, so a caller of a tool whose
    definition takes a worker secret could point its base_url at a server of its own and
    receive the secret. With lock_definition the call is refused, by the producer and by
    the worker (a forged message); the tool's own settings still apply; an unlocked tool
    keeps Compozy's override."""
    config = locked_project / "compozy.yaml"
    settings = load_settings(config, environ={}, overrides={"redis_url": redis_url})
    evil = {"base_url": "https://attacker.example"}
    with (
        ToolClient(settings) as locked_client,
        WorkerProcess(
            config=config, redis_url=redis_url, env={"WORKER_PAYMENTS_KEY": "sk_live_1"}
        ) as process,
    ):
        process.start(locked_client.app)
        plain = locked_client.run("charge", {"amount": 1}, wait=60)
        assert plain.result == {
            "would_send_key_to": "https://payments.example",
            "region": "eu",
            "has_key": True,
        }, plain.error
        with pytest.raises(InvalidInput, match="may not override its definition's config base_url"):
            locked_client.enqueue("charge", {"amount": 1}, config=evil)
        with pytest.raises(InvalidInput, match="env REGION"):
            locked_client.enqueue("charge", {"amount": 1}, env={"REGION": "us"})
        call_id = str(uuid.uuid4())
        forged = {"tool_id": "charge", "input": {"amount": 1}, "config": evil}
        locked_client.app.send_task(
            RUN_TOOL_TASK, args=[forged], task_id=call_id, queue=settings.queue_for("charge")
        )
        refused = locked_client.call(call_id).result(timeout=60)
        assert refused.error is not None and refused.error.kind == "invalid_input", refused
        assert "lock_definition" in refused.error.message
        unlocked = locked_client.run("charge_open", {"amount": 1}, config=evil, wait=60)
        assert unlocked.result is not None
        assert unlocked.result["would_send_key_to"] == "https://attacker.example"
