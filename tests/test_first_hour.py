"""The first hour with a real project (issue 28), end to end: a Compozy project shaped
like the examples in Compozy's own monorepo (tests/projects/market_monorepo/desk: a
`workspace:*` dependency, schemas referenced as `$global::schemas.#(id=="quote")`, a
default-exported tool, Deno-era definitions), installed with `toolq install` and run
by a real worker (real Redis, Celery and Bun)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import StartWorker, wait_until
from toolq import presence
from toolq.config.loader import load_settings
from toolq.errors import ConfigError, InvalidInput
from toolq.presence import live_workers
from toolq.producers.client import ToolClient
from toolq.workers.process import WorkerProcess

MONOREPO = Path(__file__).resolve().parent / "projects" / "market_monorepo"


def toolq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "toolq", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def own_directory() -> Iterator[Path]:
    """A directory of the test's own under /tmp, readable by the sandboxed tools' uid as
    a deployed project is. Not pytest's basetemp: a pytest session started meanwhile
    (another checkout's run) clears that, and with it a project a worker is using."""
    path = Path(tempfile.mkdtemp(prefix="toolq-first-hour-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[Path]:
    yield from own_directory()


@pytest.fixture(scope="module")
def desk() -> Iterator[Path]:
    """The monorepo copied as a user has it; the desk's packages installed the way the
    docs say (docs/writing-tools.md), `toolq install` (the workers' pinned Bun; `bun` is
    not on PATH)."""
    for parent in own_directory():
        yield from _installed(parent)


def _installed(parent: Path) -> Iterator[Path]:
    root = parent / "market_monorepo"
    shutil.copytree(MONOREPO, root)
    installed = toolq("install", str(root / "desk"))
    assert installed.returncode == 0, installed.stderr
    assert (root / "desk" / "node_modules" / "@market" / "pricing").is_dir()
    yield root / "desk"


@pytest.fixture(scope="module")
def desk_client(desk: Path, redis_url: str) -> Iterator[ToolClient]:
    settings = load_settings(desk / "compozy.yaml", environ={}, overrides={"redis_url": redis_url})
    with ToolClient(settings) as client:
        yield client


@pytest.fixture(scope="module")
def desk_worker(desk: Path, desk_client: ToolClient, redis_url: str) -> Iterator[WorkerProcess]:
    with WorkerProcess(config=desk / "compozy.yaml", redis_url=redis_url) as worker:
        worker.start(desk_client.app)
        yield worker


# -- 1. Compozy's schema references ---------------------------------------------------


def test_schema_references_resolve_and_a_broken_output_never_crashes(
    desk_client: ToolClient, desk_worker: WorkerProcess
) -> None:
    # The default-exported tool (its own file, a workspace package) returns what its
    # `$global::schemas.#(id=="quote")` output schema asks: a success, not a crash.
    quote = desk_client.run("quote", {"symbol": "ACME", "qty": 2}, wait=60)
    assert quote.ok, quote.error
    assert quote.result == {"symbol": "ACME", "price": 25, "currency": "EUR"}
    assert quote.metadata["attempts"] == 1
    basket = desk_client.run("basket", {"symbols": ["ACME", "INIT"]}, wait=60)  # ref in items
    assert basket.ok, basket.error
    # The referenced input schema is checked at the call site.
    with pytest.raises(InvalidInput, match=r"input\.symbol: 'acme' does not match"):
        desk_client.enqueue("quote", {"symbol": "acme"})
    # A result that breaks the referenced schema is invalid_output, once: never crashed,
    # never retried (max_attempts is 3 in this project).
    bad = desk_client.run("bad_quote", {"symbol": "ACME"}, wait=60)
    assert bad.error is not None and bad.error.kind == "invalid_output", bad.error
    assert "result.price: 'call us' is not of type 'number'" in bad.error.message
    assert bad.metadata["attempts"] == 1
    log = desk_worker.output()
    assert "Unresolvable" not in log and "ReferencingError" not in log


def write_project(directory: Path, output: str, extra: str = "") -> Path:
    (directory / "tools").mkdir(parents=True, exist_ok=True)
    (directory / "compozy.yaml").write_text(
        "name: refs\nschemas:\n  - id: quote\n    type: object\n"
        "autoload:\n  enabled: true\n  include: ['tools/*.yaml']\n" + extra
    )
    (directory / "tools" / "t.yaml").write_text(f"resource: tool\nid: t\noutput:\n{output}")
    return directory / "compozy.yaml"


@pytest.mark.parametrize(
    ("output", "named"),
    [
        ('  $ref: $global::schemas.#(id=="qoute")', "no entry with id == 'qoute' (entries: quote)"),
        ("  $ref: $global::models.0", "'models' not found"),
        ("  type: object\n  properties:\n    a: {$ref: 'https://x.invalid/s.json'}", "fetches"),
        ("  $ref: '#/definitions/missing'", "does not resolve inside the schema"),
        ("  $ref: elsewhere::schemas.0", "unknown scope 'elsewhere'"),
    ],
)
def test_a_reference_that_does_not_resolve_is_refused_at_load_with_its_location(
    scratch: Path, output: str, named: str
) -> None:
    config = write_project(scratch, output)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    message = str(info.value)
    assert str(scratch / "tools" / "t.yaml") in message and "output" in message
    assert named in message


def test_references_work_in_list_entries_and_local_scope(scratch: Path) -> None:
    extra = (
        "tools:\n  - id: inline\n    input:\n"
        "      $ref: local::schemas.#(id=='quote')\n      required: [x]\n"
    )
    config = write_project(scratch, '  $ref: $global::schemas.#(id=="quote")', extra)
    settings = load_settings(config, environ={})
    assert settings.definitions["t"].output_schema == {"type": "object"}
    inline = settings.definitions["inline"]
    assert inline.input_schema == {"type": "object", "required": ["x"]}  # siblings kept


# -- 2. toolq install and dependencies Bun cannot resolve -----------------------------


def test_a_workspace_dependency_outside_its_workspace_is_named(
    scratch: Path, desk_client: ToolClient, redis_url: str
) -> None:
    alone = scratch / "desk"
    shutil.copytree(MONOREPO / "desk", alone)  # taken out of its monorepo
    installed = toolq("install", str(alone))
    assert installed.returncode == 2
    assert '"@market/pricing": "workspace:*"' in installed.stderr
    assert "workspace" in installed.stderr and "file:" in installed.stderr
    # A worker started on it says the same, not "run bun install" again.
    worker = WorkerProcess(config=alone / "compozy.yaml", redis_url=redis_url)
    try:
        with pytest.raises(RuntimeError, match="exited with code 2") as info:
            worker.start(desk_client.app)
    finally:
        worker.close()
    assert "fix: " in str(info.value)
    assert '"@market/pricing": "workspace:*"' in str(info.value)
    assert "bun install" not in str(info.value)


def test_a_deno_npm_import_is_named(scratch: Path, desk_client: ToolClient, redis_url: str) -> None:
    (scratch / "compozy.yaml").write_text("name: deno-era\n")
    (scratch / "entrypoint.ts").write_text(
        'import { z } from "npm:zod@3.23";\nexport default { check: () => z };\n'
    )
    worker = WorkerProcess(config=scratch / "compozy.yaml", redis_url=redis_url)
    try:
        with pytest.raises(RuntimeError, match="exited with code 2") as info:
            worker.start(desk_client.app)
    finally:
        worker.close()
    message = str(info.value)
    assert "'npm:zod@3.23' is a Deno-style npm: import" in message
    assert "import 'zod' instead" in message and "toolq install" in message


def test_install_needs_a_package_json(scratch: Path) -> None:
    result = toolq("install", str(scratch))
    assert result.returncode == 2 and "no package.json" in result.stderr


# -- 3. errors that name the missing grant --------------------------------------------


def test_what_the_sandbox_refused_names_the_grant(
    desk: Path, desk_client: ToolClient, desk_worker: WorkerProcess
) -> None:
    dns = desk_client.run("market_status", {"url": "https://quotes.example.com/"}, wait=60)
    assert dns.error is not None and dns.error.kind == "tool_error"
    assert "UNSANDBOXED" not in desk_worker.output()
    assert "getaddrinfo EAI_AGAIN" in dns.error.message  # the tool's own error stays
    assert "no --allow-net" in dns.error.message
    assert "--allow-net=quotes.example.com" in dns.error.message
    write = desk_client.run("save_note", {"text": "hi"}, wait=60)
    assert write.error is not None and "EROFS" in write.error.message
    assert f"--allow-write={desk.resolve()}" in write.error.message


def test_the_start_up_check_names_the_grant(
    scratch: Path, desk_client: ToolClient, redis_url: str
) -> None:
    (scratch / "compozy.yaml").write_text("name: eager\n")
    (scratch / "entrypoint.ts").write_text(
        'await fetch("https://config.example.com/flags");\nexport default { a: () => 1 };\n'
    )
    worker = WorkerProcess(config=scratch / "compozy.yaml", redis_url=redis_url)
    try:
        with pytest.raises(RuntimeError, match="exited with code 2") as info:
            worker.start(desk_client.app)
    finally:
        worker.close()
    assert "fix: the entrypoint's top-level code was refused" in str(info.value)
    assert "--allow-net=config.example.com" in str(info.value)


# -- 4. a call nobody is listening for -------------------------------------------------


def test_toolq_run_says_at_once_that_no_worker_consumes_the_queue(
    desk: Path, desk_worker: WorkerProcess, redis_url: str
) -> None:
    env = {"TOOLQ_REDIS_URL": redis_url, "TOOLQ_CONFIG": str(desk / "compozy.yaml")}
    empty = f"nobody-{uuid.uuid4().hex[:8]}"
    lonely = toolq(
        "run", "quote", "--input", '{"symbol":"ACME"}', "--queue", empty, "--wait", "1s", env=env
    )
    assert lonely.returncode == 3  # still queued
    assert f"toolq: warning: no live worker consumes queue '{empty}'" in lonely.stderr
    assert f"--queues {empty}" in lonely.stderr  # how to start one
    served = toolq("run", "quote", "--input", '{"symbol":"ACME"}', "--wait", "60s", env=env)
    assert served.returncode == 0, served.stderr
    assert "no live worker" not in served.stderr
    assert json.loads(served.stdout)["result"]["price"] == 12.5


def test_the_client_warns_once_per_queue_and_looks_rarely(
    desk_client: ToolClient,
    desk_worker: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looks: list[str] = []

    def counted(client: redis.Redis, queue: str, stale_s: float = presence.STALE_S) -> int:
        looks.append(queue)
        return live_workers(client, queue, stale_s)

    monkeypatch.setattr(presence, "live_workers", counted)
    empty = f"nobody-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="toolq.producer"):
        calls = [desk_client.enqueue("quote", {"symbol": "ACME"}, queue=empty) for _ in range(20)]
        served = [desk_client.enqueue("quote", {"symbol": "ACME"}) for _ in range(20)]
    unserved = [r for r in caplog.records if "no live worker" in r.getMessage()]
    assert len(unserved) == 1 and repr(empty) in unserved[0].getMessage()
    assert looks.count(empty) == 1 and looks.count(desk_client.settings.queue) <= 1
    for call in served:
        assert call.result(timeout=60).ok
    for call in calls:
        call.forget()


def test_a_stopped_worker_leaves_its_queues_at_once(
    start_worker: StartWorker, client: ToolClient
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    worker = start_worker(queues=[queue])
    redis_client = redis.Redis.from_url(client.settings.redis_url)
    try:
        assert wait_until(lambda: live_workers(redis_client, queue) == 1)
        worker.stop()
        assert live_workers(redis_client, queue) == 0  # gone when it stopped, not 10 s later
    finally:
        redis_client.close()


# -- 5. silent starts -------------------------------------------------------------------


def test_the_worker_warns_about_what_it_will_not_run(desk_worker: WorkerProcess) -> None:
    log = desk_worker.output()
    assert "tool headlines is defined in" in log and "does not export it" in log
    assert "default export under 'headlines'" in log
    assert "tool legacy_report" in log and "execute: ./legacy_report.ts" in log
    assert "tool format_brief is defined inside the workflow file" in log
    assert "move it to tools/format_brief.yaml" in log


def test_an_entrypoint_exporting_no_tools_is_a_warning(
    scratch: Path, desk_client: ToolClient, redis_url: str
) -> None:
    (scratch / "compozy.yaml").write_text("name: empty-desk\n")
    (scratch / "entrypoint.ts").write_text("export const VERSION = '1.0';\n")
    with WorkerProcess(config=scratch / "compozy.yaml", redis_url=redis_url) as worker:
        worker.start(desk_client.app)
        assert "exports no tools" in worker.output()
        assert "export default { my_tool }" in worker.output()


def test_native_code_at_import_names_allow_ffi(
    scratch: Path, desk_client: ToolClient, redis_url: str
) -> None:
    (scratch / "compozy.yaml").write_text("name: native\n")
    (scratch / "entrypoint.ts").write_text(
        'import { dlopen } from "bun:ffi";\n'
        'const libc = dlopen("libc.so.6", { getpid: { returns: "i32" } });\n'
        "export default { pid: () => libc.symbols.getpid() };\n"
    )
    worker = WorkerProcess(config=scratch / "compozy.yaml", redis_url=redis_url)
    try:
        with pytest.raises(RuntimeError, match="exited with code 2") as info:
            worker.start(desk_client.app)
    finally:
        worker.close()
    assert "fix: a module the entrypoint imports loads native code" in str(info.value)
    assert "add --allow-ffi to runtime.permissions" in str(info.value)


def test_a_default_exported_function_is_a_warning(
    scratch: Path, desk_client: ToolClient, redis_url: str
) -> None:
    (scratch / "compozy.yaml").write_text("name: one-tool\n")
    (scratch / "entrypoint.ts").write_text("export default async function quote() {}\n")
    with WorkerProcess(config=scratch / "compozy.yaml", redis_url=redis_url) as worker:
        worker.start(desk_client.app)
        assert "default-exports a function, so its one tool is named 'default'" in (worker.output())
