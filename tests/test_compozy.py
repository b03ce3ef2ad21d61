"""Real Compozy projects run unchanged: a full project file, autoloaded tool definitions
(schemas, `with`, `config`, templated `env`, `timeout`), an npm dependency, two
projects on one Redis, and projects that cannot load (real Redis, workers and Bun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from toolq.config.celery_app import RUN_TOOL_TASK
from toolq.config.loader import load_settings
from toolq.errors import InvalidInput
from toolq.producers.client import ToolClient
from toolq.workers.breaker import Breakers
from toolq.workers.deadletter import DeadLetters
from toolq.workers.process import WorkerProcess

PROJECTS = Path(__file__).resolve().parent / "projects"
TOKEN = "tok-desk-5f3a9c1e77"
"""The worker's secret that weather_lookup's env template reads."""


def copy_project(name: str, into: Path) -> Path:
    # pytest makes `into` 0700: a root worker's tools (uid 65534) could not read the project,
    # and the worker refuses to start (sandbox: auto no longer runs them unsandboxed)
    into.chmod(into.stat().st_mode | 0o005)
    project = into / name
    shutil.copytree(PROJECTS / name, project)
    return project


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory, bun: Path) -> Path:
    """weather-desk, its dependencies installed (`bun install`, a local file: package)."""
    project = copy_project("weather_desk", tmp_path_factory.mktemp("desk"))
    subprocess.run([str(bun), "install"], cwd=project, check=True, capture_output=True, timeout=120)
    return project


def project_client(project: Path, redis_url: str) -> ToolClient:
    settings = load_settings(
        project / "compozy.yaml", environ={}, overrides={"redis_url": redis_url}
    )
    return ToolClient(settings)


@pytest.fixture(scope="module")
def desk_client(desk: Path, redis_url: str) -> Iterator[ToolClient]:
    with project_client(desk, redis_url) as client:
        yield client


@pytest.fixture(scope="module")
def desk_worker(desk: Path, desk_client: ToolClient, redis_url: str) -> Iterator[WorkerProcess]:
    """Started as an operator would: `toolq worker --config <project>/compozy.yaml`, no
    queue given, the token in the worker's own environment."""
    env = {"WEATHER_DESK_TOKEN": TOKEN}
    with WorkerProcess(config=desk / "compozy.yaml", redis_url=redis_url, env=env) as worker:
        worker.start(desk_client.app)
        yield worker


def toolq_cli(project: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TOOLQ_REDIS_URL": redis_url,
        "TOOLQ_CONFIG": str(project / "compozy.yaml"),
    }
    return subprocess.run(
        [sys.executable, "-m", "toolq", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_a_compozy_project_runs_unchanged(
    desk: Path, desk_client: ToolClient, desk_worker: WorkerProcess, redis_url: str
) -> None:
    assert desk_client.settings.queue == "weather-desk"  # the project's own default queue
    weather = desk_client.run("weather_lookup", {"city": "Lisbon"}, wait=30)
    assert weather.ok, weather.error
    assert weather.result == {
        "city": "Lisbon",
        "units": "metric",  # `with` filled it in
        "temperature": 21,
        "base_url": "https://weather.example.invalid/v2",  # the definition's config
        "format": "compact",
        "retries": 2,
        "region": "eu-west",  # the definition's plain env
        "token_length": len(TOKEN),  # {{ .env.WEATHER_DESK_TOKEN }} from the worker
    }
    # The call's input wins over `with`; a per-call config overrides key by key.
    custom = desk_client.run(
        "weather_lookup", {"city": "Oslo", "units": "imperial"}, config={"format": "full"}, wait=30
    )
    assert custom.ok, custom.error
    assert custom.result["temperature"] == 70 and custom.result["units"] == "imperial"
    assert custom.result["format"] == "full"
    assert custom.result["base_url"] == "https://weather.example.invalid/v2"

    price = desk_client.run("format_price", {"amount": 3}, wait=30)  # uses an npm package
    assert price.ok, price.error
    assert price.result == {"text": "EUR 3.00"}
    assert desk_client.run(
        "format_price", {"amount": 2.5}, config={"currency": "USD"}, wait=30
    ).result == {"text": "USD 2.50"}

    greeting = desk_client.run("inline_greeting", {"who": "Ana"}, wait=30)  # tools: list entry
    assert greeting.ok and greeting.result["text"] == "Hello, Ana!"

    cli = toolq_cli(desk, redis_url, "run", "format_price", "--input", '{"amount": 1}')
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["result"] == {"text": "EUR 1.00"}
    cli = toolq_cli(
        desk, redis_url, "run", "format_price", "--input", '{"amount": 1}',
        "--tool-config", '{"currency": "GBP"}',
    )  # fmt: skip
    assert json.loads(cli.stdout)["result"] == {"text": "GBP 1.00"}
    bad = toolq_cli(desk, redis_url, "run", "format_price", "--tool-config", "[1]")
    assert bad.returncode == 2 and "--tool-config must be a JSON object" in bad.stderr

    info = desk_client.run("runtime_info", wait=30)
    root = str(desk.resolve())
    assert info.result == {"runtime": "worker", "root": root, "cwd": root}


def test_the_input_schema_refuses_bad_calls_at_the_call_site(
    desk: Path, desk_client: ToolClient, redis_url: str
) -> None:
    with pytest.raises(InvalidInput, match=r"input\.city: 'city' is a required property"):
        desk_client.enqueue("weather_lookup", {"units": "metric"})
    with pytest.raises(InvalidInput, match=r"input\.units: 'kelvin' is not one of"):
        desk_client.enqueue("weather_lookup", {"city": "Rome", "units": "kelvin"})
    with pytest.raises(InvalidInput, match=r"input\.who"):
        desk_client.enqueue("inline_greeting", {"who": ""})
    with pytest.raises(InvalidInput, match="config must be an object"):
        desk_client.enqueue("weather_lookup", {"city": "Rome"}, config=["x"])  # type: ignore[arg-type]
    proc = toolq_cli(desk, redis_url, "run", "weather_lookup", "--input", '{"city": 12}')
    assert proc.returncode == 2, proc.stderr
    assert "input.city" in proc.stderr and "not of type 'string'" in proc.stderr


def test_the_worker_validates_calls_that_bypass_the_client(
    desk_client: ToolClient, desk_worker: WorkerProcess, redis_url: str
) -> None:
    def send(tool_input: object) -> dict[str, object]:
        message = {
            "tool_id": "weather_lookup",
            "input": tool_input,
            "env": {},
            "enqueued_at": time.time(),
        }
        sent = desk_client.app.send_task(RUN_TOOL_TASK, args=[message], queue="weather-desk")
        return desk_client.call(sent.id).result(timeout=30).to_dict()

    refused = send({"city": 7})
    assert refused["status"] == "error"
    error = refused["error"]
    assert isinstance(error, dict) and error["kind"] == "invalid_input"
    assert "input.city" in error["message"]
    merged = send({"city": "Porto"})  # `with` is merged in the worker too
    assert merged["status"] == "success" and merged["result"]["units"] == "metric"  # type: ignore[index]
    with redis.Redis.from_url(redis_url) as connection:  # refused before the breaker
        assert connection.hget("toolq:weather-desk:breaker:weather_lookup", "failures") in (
            None,
            b"0",
        )


def test_output_schema_and_definition_timeout(
    desk_client: ToolClient, desk_worker: WorkerProcess
) -> None:
    bad = desk_client.run("forecast_summary", wait=30)
    assert bad.error is not None and bad.error.kind == "invalid_output"
    assert "result.total" in bad.error.message and "output schema" in bad.error.message
    slow = desk_client.run("slow_station", wait=30)  # definition: timeout 1s; runtime 20s
    assert slow.error is not None and slow.error.kind == "timeout"


def test_resolved_env_values_are_never_logged_or_stored(
    desk: Path, desk_client: ToolClient, desk_worker: WorkerProcess, redis_url: str
) -> None:
    failed = desk_client.run("weather_lookup", {"city": "Faro"}, config={"fail": True}, wait=30)
    assert failed.error is not None and failed.error.kind == "tool_error"
    assert TOKEN not in json.dumps(failed.to_dict())
    with redis.Redis.from_url(redis_url) as connection:
        entry = DeadLetters(connection, 100, namespace=desk_client.settings.keys).get(failed.id)
        assert entry is not None and entry["config"] == {"fail": True}
        assert TOKEN not in json.dumps(entry)
        stored = [connection.dump(key) or b"" for key in connection.scan_iter()]
        assert not any(TOKEN.encode() in value for value in stored)  # nowhere in Redis
        settings = desk_client.settings  # the failure opened the breaker (fail_max 1)
        Breakers(connection, settings.breaker_settings, settings.keys).reset("weather_lookup")
    log = desk_worker.output()
    assert "calling https://weather.example.invalid/v2 with ***" in log  # the tool's stderr
    assert TOKEN not in log


def test_a_template_naming_a_missing_worker_variable_refuses_the_call(
    desk: Path, desk_client: ToolClient, redis_url: str
) -> None:
    env = {key: value for key, value in os.environ.items() if key != "WEATHER_DESK_TOKEN"}
    with WorkerProcess(
        config=desk / "compozy.yaml", redis_url=redis_url, queues=["desk-no-token"], env=env
    ) as worker:
        worker.start(desk_client.app)
        result = desk_client.run("weather_lookup", {"city": "Bern"}, queue="desk-no-token", wait=30)
        assert "WEATHER_DESK_TOKEN" in worker.output()  # warned at start-up, by name
    assert result.error is not None and result.error.kind == "invalid_input"
    assert "WEATHER_DESK_TOKEN" in result.error.message


def test_two_projects_on_one_redis_never_see_each_other(
    desk: Path,
    desk_client: ToolClient,
    desk_worker: WorkerProcess,
    tmp_path: Path,
    redis_url: str,
) -> None:
    harbour = copy_project("harbour_ops", tmp_path)
    with (
        project_client(harbour, redis_url) as harbour_client,
        WorkerProcess(config=harbour / "compozy.yaml", redis_url=redis_url) as harbour_worker,
    ):
        harbour_worker.start(harbour_client.app)
        # Same tool id in both projects, default settings: each answers its own calls.
        desk_answers = desk_client.map("whoami", [{}] * 6, wait=60)
        harbour_answers = harbour_client.map("whoami", [{}] * 6, wait=60)
        assert {r.result["project"] for r in desk_answers if r.result} == {"weather-desk"}
        assert {r.result["project"] for r in harbour_answers if r.result} == {"harbour-ops"}
        assert all(r.ok for r in desk_answers + harbour_answers)

        # weather-desk's always_down trips its breaker (fail_max 1); harbour-ops' is untouched.
        first = desk_client.run("always_down", wait=30)
        assert first.error is not None and first.error.kind == "tool_error"
        second = desk_client.run("always_down", wait=30)
        assert second.error is not None and second.error.kind == "circuit_open"
        healthy = harbour_client.run("always_down", wait=30)
        assert healthy.ok and healthy.result == {"up": True}

        with redis.Redis.from_url(redis_url) as connection:
            assert connection.hget("toolq:weather-desk:breaker:always_down", "state") == b"open"
            assert connection.hget("toolq:harbour-ops:breaker:always_down", "state") in (
                None,
                b"closed",
            )
            assert not connection.exists("toolq:breaker:always_down")  # no shared keys
            harbour_letters = DeadLetters(connection, 100, namespace=harbour_client.settings.keys)
            assert harbour_letters.count() == 0
            assert DeadLetters(connection, 100, namespace=desk_client.settings.keys).get(first.id)

        status = toolq_cli(harbour, redis_url, "status", "--json")
        report = json.loads(status.stdout)
        assert report["project"] == "harbour-ops" and report["dead_letters"] == 0
        assert all(b["state"] == "closed" for b in report["breakers"])


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_a_project_without_its_dependencies_installed_does_not_start(
    tmp_path: Path, redis_url: str, desk_client: ToolClient, mode: str
) -> None:
    project = copy_project("weather_desk", tmp_path)  # no `bun install`
    worker = WorkerProcess(
        config=project / "compozy.yaml", redis_url=redis_url, env={"TOOLQ_RUNTIME__MODE": mode}
    )
    try:
        with pytest.raises(RuntimeError, match="exited with code 2") as info:
            worker.start(desk_client.app)
    finally:
        worker.close()
    message = str(info.value)
    assert "tiny-format" in message  # Bun's own error
    assert f"run `toolq install {project.resolve()}`" in message  # and the fix


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_an_entrypoint_that_does_not_parse_does_not_start(
    tmp_path: Path, redis_url: str, desk_client: ToolClient, mode: str
) -> None:
    (tmp_path / "compozy.yaml").write_text("name: broken-desk\nruntime:\n  type: bun\n")
    (tmp_path / "entrypoint.ts").write_text("export default {\n  async broken( {\n};\n")
    worker = WorkerProcess(
        config=tmp_path / "compozy.yaml", redis_url=redis_url, env={"TOOLQ_RUNTIME__MODE": mode}
    )
    try:
        with pytest.raises(RuntimeError, match="exited with code 2") as info:
            worker.start(desk_client.app)
    finally:
        worker.close()
    message = str(info.value)
    assert f"cannot load {(tmp_path / 'entrypoint.ts').resolve()}" in message
    assert "Expected" in message and "entrypoint.ts:3:" in message  # Bun's error, where
    assert "fix the entrypoint" in message
