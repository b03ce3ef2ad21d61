"""Fixtures: a real Redis (a database of this run's own), real workers, real Bun."""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from toolq.cli.devredis import ensure_redis, scratch_database
from toolq.config.loader import load_settings
from toolq.producers.client import ToolClient
from toolq.workers.process import WorkerProcess
from toolq.workers.runtime.bun import find_bun

TOOLS = Path(__file__).resolve().parent / "tools"
TOOLS_CONFIG = TOOLS / "compozy.yaml"


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: pytest alone knows no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With ``--dist loadgroup`` (`make test`), the end-to-end tier is spread over its test
    processes test by test: most tests wait on workers, Bun or a timeout, and whole
    modules (``--dist loadfile``) left one long module running alone at the end. A module
    that defines a fixture of module scope (a project installed, a wheel built, a worker
    started) stays whole on one process, so that fixture is set up once; the largest go
    first. (pytest-xdist's own ``xdist_group`` marks are not seen under pytest 9.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesWithModuleFixturesStayWhole(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if _defines_module_fixture(config.rootpath / module) else nodeid

    return ModulesWithModuleFixturesStayWhole(config, log)


@functools.cache
def _defines_module_fixture(module: Path) -> bool:
    """Whether ``module`` defines a ``@pytest.fixture(scope="module", ...)`` (a test id that
    names no Python file, or a scope given by a function, counts as not)."""
    try:
        tree = ast.parse(module.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return False
    scopes = (
        keyword.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.fixture"
        for keyword in node.keywords
        if keyword.arg == "scope" and isinstance(keyword.value, ast.Constant)
    )
    return "module" in scopes


@pytest.fixture(autouse=True)
def _no_toolq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no TOOLQ_* from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("TOOLQ_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session", autouse=True)
def _tools_may_enter(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The base temp directory open to uid 65534 before any module-scoped fixture puts a
    project under it (a root worker refuses a project its tools cannot read)."""
    if os.geteuid() == 0:
        base = tmp_path_factory.getbasetemp()
        os.chmod(base, 0o1777)
        # pytest-xdist gives each test process a basetemp inside one it made 0700
        for parent in base.parents:
            if parent == TOOLS or not parent.is_relative_to(TOOLS):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o001)


@pytest.fixture(autouse=True)
def _tools_may_write(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Sandboxed tools run as uid 65534 on the host when the tests run as root (CI): the
    directories they are granted (--allow-write) must be writable by that uid, as in
    production. pytest makes its temp directories 0700."""
    if os.geteuid() != 0:
        return
    os.chmod(tmp_path_factory.getbasetemp(), 0o1777)
    if "tmp_path" in request.fixturenames:
        os.chmod(request.getfixturevalue("tmp_path"), 0o1777)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with (
        ensure_redis(os.environ.get("TOOLQ_REDIS_URL")) as base_url,
        scratch_database(base_url, "test-run") as url,
    ):
        yield url


@pytest.fixture(scope="session")
def bun() -> Path:
    return find_bun(None, TOOLS)


@pytest.fixture(scope="session")
def settings(redis_url: str) -> Any:
    return load_settings(TOOLS_CONFIG, environ={}, overrides={"redis_url": redis_url})


@pytest.fixture(scope="session")
def client(settings: Any) -> Iterator[ToolClient]:
    with ToolClient(settings) as tool_client:
        yield tool_client


@pytest.fixture(scope="session")
def worker(client: ToolClient, redis_url: str) -> Iterator[WorkerProcess]:
    """The shared worker: threads pool (production's), 4 tools at once, on the default queue."""
    with WorkerProcess(config=TOOLS_CONFIG, redis_url=redis_url) as process:
        process.start(client.app)
        yield process


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(client: ToolClient, redis_url: str) -> Iterator[StartWorker]:
    """Start extra workers (each on its own queue unless told otherwise); stopped afterwards."""
    started: list[WorkerProcess] = []

    def start(**kwargs: Any) -> WorkerProcess:
        kwargs.setdefault("config", TOOLS_CONFIG)
        kwargs.setdefault("queues", [f"q-{uuid.uuid4().hex[:8]}"])
        process = WorkerProcess(redis_url=redis_url, **kwargs)
        started.append(process)
        return process.start(client.app)

    yield start
    stop_together(started)


def stop_together(processes: list[WorkerProcess]) -> None:
    """Stop workers as close() does, all at once: SIGTERM to each, then wait for each (a
    warm shutdown takes 0.3 s, a prefork one nearly 2 s)."""
    for process in processes:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.send_signal(signal.SIGTERM)
    for process in processes:
        if process.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.proc.wait(timeout=20)  # else close() signals again, then kills
        process.close()


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def processes_running(*argv: str) -> list[int]:
    """Host pids whose command line is exactly ``argv`` (zombies excluded)."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if cmdline.read() == wanted and process_alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (by parent pid), at this moment."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def unique_seconds() -> str:
    """A `sleep` duration no other process has: 300.<random digits>."""
    return f"300.{uuid.uuid4().int % 10**9:09d}"


def open_sockets() -> int:
    """This process's open sockets."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def check_a_closed_client_leaves_no_socket_open(settings: Any) -> None:
    """Waiting for results opens connections in each thread that waits (a pub/sub one
    among them, and for a Sentinel URL the sentinels'); close() must close every one,
    without the garbage collector's help (Celery's close() left two per thread). kombu's
    broker pool, one per URL for the whole process, stays for the next client: a first
    client makes it. A worker must serve the settings' queue."""
    with ToolClient(settings) as first:
        assert first.run("echo", {}, wait=30).ok
    gc.collect()
    gc.disable()  # a cycle collected meanwhile would close what close() must close
    try:
        before = open_sockets()
        answers: list[Any] = []
        with ToolClient(settings) as client:
            answers.append(client.run("echo", {"thread": "main"}, wait=30))
            answers.extend(client.map("echo", [{"n": n} for n in range(3)], wait=30))
            other = threading.Thread(
                target=lambda: answers.append(client.run("echo", {"thread": "other"}, wait=30))
            )
            other.start()
            other.join()
            assert open_sockets() > before
        assert len(answers) == 5 and all(answer.ok for answer in answers)
        assert open_sockets() == before  # closed: back to what it found
    finally:
        gc.enable()
