"""Compozy project files and tool definitions: what is read, accepted, refused; the
precedence of definitions and toolq's settings; schemas, `with`, `config` and `env`
templates; project namespaces. Pure parsing and policy: no Redis, no Bun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fast.fakes import FakeBreakers, ok, rig
from toolq.config import load_settings
from toolq.config.celery_app import celery_config
from toolq.config.settings import Settings
from toolq.config.tooldefs import ToolDefinition, parse_definition
from toolq.errors import ConfigError, InvalidInput
from toolq.keys import Keys
from toolq.protocol import CallRequest, new_request, validate
from toolq.workers.call.attempt import Delivery, Final
from toolq.workers.profile import Profiles

DESK = Path(__file__).resolve().parents[1] / "projects" / "weather_desk" / "compozy.yaml"
HARBOUR = DESK.parents[1] / "harbour_ops" / "compozy.yaml"


def write(tmp_path: Path, text: str, name: str = "compozy.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def definition(**raw: Any) -> ToolDefinition:
    return parse_definition({"id": "t", **raw}, "test")[0]


# -- the project file ---------------------------------------------------------------------


def test_a_full_compozy_project_file_loads() -> None:
    settings = load_settings(DESK, environ={})
    assert settings.name == "weather-desk"
    assert settings.queue == "weather-desk" and settings.project == "weather-desk"
    assert settings.runtime.timeout_s == 20  # runtime.tool_execution_timeout
    assert settings.performance.max_concurrent_tools == 2  # toolq's own section still read
    # autoload: tools/*.yaml with resource: tool, less the excluded draft; agents skipped;
    # the tools: list's definitions; its bare-string selector defines nothing new.
    assert sorted(settings.definitions) == [
        "always_down",
        "forecast_summary",
        "format_price",
        "inline_greeting",
        "runtime_info",
        "slow_station",
        "weather_lookup",
    ]
    weather = settings.definition("weather_lookup")
    assert weather is not None and weather.defaults == {"units": "metric"}
    assert weather.config["base_url"] == "https://weather.example.invalid/v2"
    assert weather.env["WEATHER_TOKEN"] == "{{ .env.WEATHER_DESK_TOKEN }}"
    # A definition's timeout feeds the tool's limits (its own 5 s grace to the hard one).
    assert settings.limits_for("weather_lookup").timeout_s == 3
    assert settings.limits_for("slow_station").hard_timeout_s == 6
    assert settings.limits_for("whoami").timeout_s == 20


def test_unknown_keys_outside_toolqs_sections_are_compozys(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "name: x\nmy_team_notes: {owner: ana}\nsignals: []\nconfig: {a: 1}\n"
        "runtime: {type: bun, native_tools: {enabled: true}}\n",
    )
    assert load_settings(config, environ={}).runtime.type == "bun"


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("max_atempts: 3\n", "max_atempts", "max_attempts"),
        ("circuit_braker: {fail_max: 2}\n", "circuit_braker", "circuit_breaker"),
        ("runtime:\n  timout: 3s\n", "runtime.timout", "timeout"),
        ("runtime:\n  entry_point: ./x.ts\n", "runtime.entry_point", "entrypoint"),
        ("performance:\n  max_concurent_tools: 3\n", "performance.max_concurent_tools", None),
        ("tools:\n  a: {hard_timout: 3s}\n", "tools.a.hard_timout", "hard_timeout"),
        ("tools:\n  - {id: a, hard_timout: 3s}\n", "hard_timout", "hard_timeout"),
    ],
)
def test_a_typo_in_toolqs_sections_names_the_key_and_the_closest_one(
    tmp_path: Path, text: str, key: str, suggestion: str | None
) -> None:
    config = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    message = str(info.value)
    assert key in message and "unknown key" in message and str(config) in message
    expected = suggestion or key.rsplit(".", 1)[-1].replace("concurent", "concurrent")
    assert f"did you mean {expected!r}" in message


def test_tool_execution_timeout_is_runtime_timeout(tmp_path: Path) -> None:
    both = write(tmp_path, "runtime: {timeout: 3s, tool_execution_timeout: 4s}\n")
    with pytest.raises(ConfigError, match="not both"):
        load_settings(both, environ={})
    env = {"TOOLQ_RUNTIME__TOOL_EXECUTION_TIMEOUT": "7s"}
    assert load_settings(environ=env).runtime.timeout_s == 7
    # The file's alias beats a profile's runtime.timeout, as runtime.timeout would.
    aliased = write(tmp_path, "runtime: {tool_execution_timeout: 9s}\n", "a.yaml")
    assert load_settings(aliased, "production", environ={}).runtime.timeout_s == 9


def test_the_tools_list_carries_definitions_selectors_and_toolq_settings(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "tools:\n"
        "  - plain_selector\n"
        "  - id: report\n"
        "    timeout: 2s\n"
        "    mode: spawn\n"
        "    retry: {max_attempts: 2}\n"
        "    config: {title: Weekly}\n",
    )
    settings = load_settings(config, environ={})
    assert list(settings.definitions) == ["report"]
    assert settings.tool("report").mode == "spawn"
    assert settings.tool("report").retry is not None
    assert settings.limits_for("report").timeout_s == 2
    assert settings.definitions["report"].config == {"title": "Weekly"}


def test_precedence_definition_then_tools_mapping_then_environment(tmp_path: Path) -> None:
    write(tmp_path, "resource: tool\nid: lookup\ntimeout: 3s\nmode: spawn\n", "tools/lookup.yaml")
    config = write(
        tmp_path,
        "autoload: {enabled: true, include: ['tools/*.yaml']}\ntools:\n  lookup: {timeout: 4s}\n",
    )
    settings = load_settings(config, environ={})
    assert settings.limits_for("lookup").timeout_s == 4  # tools.<id> over the definition
    assert settings.tool("lookup").mode == "spawn"  # the definition's, not overridden
    env = {"TOOLQ_TOOLS__LOOKUP__TIMEOUT": "5s"}
    assert load_settings(config, environ=env).limits_for("lookup").timeout_s == 5


def test_autoload_needs_enabled_and_stays_in_the_project(tmp_path: Path) -> None:
    write(tmp_path, "resource: tool\nid: lookup\n", "tools/lookup.yaml")
    off = write(tmp_path, "autoload: {include: ['tools/*.yaml']}\n")
    assert load_settings(off, environ={}).definitions == {}
    outside = write(tmp_path, "autoload: {enabled: true, include: ['../*.yaml']}\n", "b.yaml")
    with pytest.raises(ConfigError, match="inside the project"):
        load_settings(outside, environ={})
    nested = write(tmp_path, "resource: tool\nid: deep\n", "tools/more/deep.yml")
    recursive = write(
        tmp_path, "autoload: {enabled: true, include: ['tools/**/*.y*ml']}\n", "c.yaml"
    )
    assert sorted(load_settings(recursive, environ={}).definitions) == ["deep", "lookup"]
    assert nested.is_file()


@pytest.mark.parametrize(
    ("tool", "words"),
    [
        ("resource: tool\nid: lookup\ninput: {type: objekt}\n", "input: not a valid JSON Schema"),
        ("resource: tool\nid: lookup\nwith: [1]\n", "with: expected a mapping"),
        ("resource: tool\nid: lookup\nconfig: 3\n", "config: expected a mapping"),
        ("resource: tool\nid: ../lookup\n", "id:"),
        ("resource: tool\ndescription: no id\n", "needs an id"),
        ("resource: tool\nid: a\nenv: {lower: x}\n", "env.lower"),
        ("resource: tool\nid: a\nenv: {A: '{{ .workflow.input.x }}'}\n", "only {{ .env.NAME }}"),
        ("resource: tool\nid: a\ntimeout: -1s\n", "tools.a.timeout"),
    ],
)
def test_bad_definitions_name_the_file_and_key(tmp_path: Path, tool: str, words: str) -> None:
    path = write(tmp_path, tool, "tools/bad.yaml")
    config = write(tmp_path, "autoload: {enabled: true, include: ['tools/*.yaml']}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    assert words in str(info.value) and str(path) in str(info.value)


def test_a_tool_defined_twice_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "resource: tool\nid: lookup\n", "tools/lookup.yaml")
    config = write(
        tmp_path,
        "autoload: {enabled: true, include: ['tools/*.yaml']}\ntools:\n  - id: lookup\n",
    )
    with pytest.raises(ConfigError, match="defined twice"):
        load_settings(config, environ={})


def test_toolq_config_shows_definitions_without_env_values(tmp_path: Path) -> None:
    settings = load_settings(DESK, environ={})
    assert "WEATHER_DESK_TOKEN" not in repr(settings)  # definitions are not model fields


# -- projects and keys ----------------------------------------------------------------------


def test_projects_name_their_queue_and_keys() -> None:
    unnamed = Settings()
    assert (unnamed.queue, unnamed.project) == ("toolq", None)
    assert unnamed.keys.breaker("x") == "toolq:breaker:x"  # today's keys, unchanged
    named = Settings.model_validate({"name": "Weather Desk!"})
    assert (named.queue, named.project) == ("Weather-Desk", "Weather-Desk")
    assert named.keys.breaker("x") == "toolq:Weather-Desk:breaker:x"
    explicit = Settings.model_validate({"name": "desk", "queue": "desk-heavy"})
    assert (explicit.queue, explicit.project) == ("desk-heavy", "desk")
    queue_only = Settings.model_validate({"queue": "billing"})
    assert queue_only.project == "billing"
    keys = Keys("p")
    assert {
        keys.breakers,
        keys.dead_letters,
        keys.dead_letter_index,
        keys.idempotency("k"),
        keys.deliveries("c", 1),
    } == {
        "toolq:p:breakers",
        "toolq:p:dlq:entries",
        "toolq:p:dlq:index",
        "toolq:p:idem:k",
        "toolq:p:deliveries:c:1",
    }
    assert load_settings(HARBOUR, environ={}).keys != load_settings(DESK, environ={}).keys


# -- the call contract with definitions ---------------------------------------------------


def test_with_is_merged_under_the_input_and_the_schema_checked() -> None:
    settings = load_settings(DESK, environ={})
    request = validate(new_request("weather_lookup", {"city": "Oslo"}), settings)
    assert request.input == {"city": "Oslo", "units": "metric"}
    request = validate(
        new_request("weather_lookup", {"city": "Oslo", "units": "imperial"}), settings
    )
    assert request.input["units"] == "imperial"  # the call wins
    for bad, words in [
        ({}, "input.city: 'city' is a required property"),
        ({"city": 3}, "input.city: 3 is not of type 'string'"),
        ({"city": "x", "wind": 1}, "input: Additional properties are not allowed"),
        ("Oslo", "input: 'Oslo' is not of type 'object'"),
    ]:
        with pytest.raises(InvalidInput) as info:
            validate(new_request("weather_lookup", bad), settings)
        assert words in info.value.message and "weather_lookup" in info.value.message
    # A tool without a definition takes any input, as before.
    assert validate(new_request("whoami", [1, 2]), settings).input == [1, 2]


def test_a_per_call_config_travels_and_is_checked() -> None:
    settings = Settings()
    request = validate(new_request("t", {}, config={"format": "full"}), settings)
    message = request.to_message()
    assert message["config"] == {"format": "full"}
    assert CallRequest.from_message(json.loads(json.dumps(message))).config == {"format": "full"}
    assert "config" not in validate(new_request("t", {}), settings).to_message()
    deep: Any = {}
    node = deep
    for _ in range(150):
        node["x"] = {}
        node = node["x"]
    for bad, words in [
        (["x"], "config must be an object"),
        ({"n": float("nan")}, "config is not JSON"),
        (deep, "config nests deeper"),
        ({"big": "x" * (11 * 1024 * 1024)}, "over the limit"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            validate(new_request("t", {}, config=bad), settings)


def test_the_profile_merges_config_and_resolves_env_per_call() -> None:
    settings = load_settings(DESK, environ={})
    profile = Profiles(settings)["weather_lookup"]
    request = validate(
        new_request("weather_lookup", {"city": "Oslo"}, {"REGION": "us"}, config={"retries": 0}),
        settings,
    )
    call = profile.call(request, "call-1", environ={"WEATHER_DESK_TOKEN": "s3cret"})
    assert call.config == {
        "base_url": "https://weather.example.invalid/v2",
        "format": "compact",
        "retries": 0,  # the call's config wins, key by key
    }
    assert call.env == {"WEATHER_TOKEN": "s3cret", "WEATHER_AUTH": "Bearer s3cret", "REGION": "us"}
    assert call.time_limits.timeout_s == 3
    with pytest.raises(InvalidInput, match="WEATHER_DESK_TOKEN"):
        profile.call(request, "call-2", environ={})
    assert "s3cret" not in repr(profile)  # the resolved value is never kept


def test_an_output_that_breaks_its_schema_is_invalid_output() -> None:
    settings = load_settings(DESK, environ={})
    profile = Profiles(settings)["forecast_summary"]
    checked = profile.check_output(ok({"total": "many"}))
    assert checked.error is not None and checked.error.kind == "invalid_output"
    assert "result.total" in checked.error.message and checked.result is None
    assert profile.check_output(ok({"total": 3})).error is None


def test_calls_refused_by_the_schema_never_reach_the_runtime_or_the_breaker() -> None:
    breakers = FakeBreakers()
    r = rig([ok()], breakers=breakers)
    tool = definition(input={"type": "object", "required": ["city"]}, **{"with": {"u": 1}})
    r.handler.settings.with_definitions({"t": tool})
    message = {"tool_id": "t", "input": {"x": 1}, "env": {}, "enqueued_at": 1_000_000.0}
    decision = r.handler.handle(message, Delivery("call-1", "worker-a", "q"))
    assert isinstance(decision, Final)
    assert decision.envelope["error"]["kind"] == "invalid_input"
    assert "input.city" in decision.envelope["error"]["message"]
    assert r.runtime.calls == [] and breakers.verdicts == []
    message["input"] = {"city": "Rome"}
    decision = r.handler.handle(message, Delivery("call-2", "worker-a", "q"))
    assert isinstance(decision, Final) and decision.envelope["status"] == "success"
    assert r.runtime.calls[0].input == {"u": 1, "city": "Rome"}  # `with` merged in the worker


def test_toolq_config_lists_definitions_and_env_names_only() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "toolq", "config", "--config", str(DESK)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["_project"] == "weather-desk" and data["queue"] == "weather-desk"
    weather = data["_tool_definitions"]["weather_lookup"]
    assert weather["input_schema"] is True and weather["with"] == {"units": "metric"}
    assert weather["env"] == ["REGION", "WEATHER_AUTH", "WEATHER_TOKEN"]
    assert "eu-west" not in proc.stdout  # env values are not printed


def test_kombus_unacked_bookkeeping_is_per_project() -> None:
    """kombu restores unacknowledged deliveries older than the restoring worker's own
    visibility timeout; shared keys would let one project redeliver another's calls."""
    desk = celery_config(load_settings(DESK, environ={}))["broker_transport_options"]
    harbour = celery_config(load_settings(HARBOUR, environ={}))["broker_transport_options"]
    assert desk["unacked_key"] == "toolq:weather-desk:unacked"
    assert desk["unacked_index_key"] == "toolq:weather-desk:unacked_index"
    assert desk["unacked_mutex_key"] != harbour["unacked_mutex_key"]
    assert "unacked_key" not in celery_config(Settings())["broker_transport_options"]


def test_standard_formats_are_checked() -> None:
    tool = definition(input={"type": "object", "properties": {"to": {"format": "email"}}})
    tool.check_input({"to": "ana@example.com"})
    with pytest.raises(InvalidInput, match=r"input\.to: 'not-an-address' is not a 'email'"):
        tool.check_input({"to": "not-an-address"})
