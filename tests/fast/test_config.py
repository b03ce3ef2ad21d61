"""Settings: precedence, profiles, durations, and one clear error (exit 2) for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from toolq.config import load_settings
from toolq.config.durations import parse_duration
from toolq.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "compozy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("100ms", 0.1), ("2m", 120), ("1m30s", 90), ("1h", 3600), (5, 5), ("0.5", 0.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-1s", "abc", "", "30 s", "10x", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults_are_compozy_defaults() -> None:
    settings = load_settings(environ={})
    assert settings.runtime.timeout_s == 60
    assert settings.limits_for("any").hard_timeout_s == 65
    assert settings.runtime.permissions == ["--allow-read"]
    assert (
        settings.backoff_initial_interval_s,
        settings.backoff_max_interval_s,
        settings.backoff_max_elapsed_time_s,
    ) == (0.1, 5, 30)
    assert settings.performance.max_concurrent_tools == 10


@pytest.mark.parametrize(
    ("profile", "timeout", "backoff"),
    [("production", 30, (0.05, 2, 15)), ("development", 120, (0.1, 5, 30))],
)
def test_profiles_carry_the_guide_values(profile: str, timeout: float, backoff: tuple) -> None:
    settings = load_settings(profile=profile, environ={})
    assert settings.runtime.timeout_s == timeout
    assert (
        settings.backoff_initial_interval_s,
        settings.backoff_max_interval_s,
        settings.backoff_max_elapsed_time_s,
    ) == pytest.approx(backoff)


def test_precedence_profile_file_env_overrides(tmp_path: Path) -> None:
    config = write(tmp_path, "runtime:\n  timeout: 45s\nbackoff_max_interval: 3s\n")
    settings = load_settings(
        config,
        "production",
        environ={
            "TOOLQ_BACKOFF_MAX_INTERVAL": "4s",
            "TOOLQ_PERFORMANCE__MAX_CONCURRENT_TOOLS": "3",
        },
        overrides={"performance.max_concurrent_tools": 2},
    )
    assert settings.runtime.timeout_s == 45  # file over profile
    assert settings.backoff_initial_interval_s == 0.05  # profile over default
    assert settings.backoff_max_interval_s == 4  # env over file
    assert settings.performance.max_concurrent_tools == 2  # command line over env
    assert settings.project_dir == tmp_path.resolve()


def test_config_from_environment_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, "runtime:\n  timeout: 7s\n", "other.yaml")
    assert load_settings(environ={"TOOLQ_CONFIG": str(config)}).runtime.timeout_s == 7
    write(tmp_path, "runtime:\n  timeout: 9s\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}).runtime.timeout_s == 9


def test_per_tool_overrides_and_call_timeout(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "runtime: {timeout: 10s, hard_timeout: 12s}\n"
        "tools:\n  quick: {timeout: 1s}\n  fixed: {timeout: 2s, hard_timeout: 9s}\n",
    )
    settings = load_settings(config, environ={})
    assert (
        settings.limits_for("other").timeout_s,
        settings.limits_for("other").hard_timeout_s,
    ) == (10, 12)
    assert (
        settings.limits_for("quick").timeout_s,
        settings.limits_for("quick").hard_timeout_s,
    ) == (1, 6)
    assert settings.limits_for("fixed").hard_timeout_s == 9
    assert settings.limits_for("fixed", call_timeout_s=3).hard_timeout_s == 10  # grace kept
    assert settings.redelivery_s > settings.max_hard_timeout_s == 12


def test_compozy_project_keys_are_accepted(tmp_path: Path) -> None:
    config = write(tmp_path, "name: app\nversion: 1.0.0\nworkflows: []\nruntime:\n  type: bun\n")
    assert load_settings(config, environ={}).runtime.type == "bun"


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("runtime:\n  timeout: -3s\n", "runtime.timeout", "negative"),
        ("runtime:\n  timout: 3s\n", "runtime.timout", "unknown key"),
        (
            "performance:\n  max_concurrent_tools: ten\n",
            "performance.max_concurrent_tools",
            "integer",
        ),
        ("tools:\n  a:\n    timeout: 2s\n    colour: red\n", "tools.a.colour", "unknown key"),
        ("runtime:\n  type: deno\n", "runtime.type", "bun"),
        ("runtime:\n  permissions: [--allow-evil]\n", "runtime.permissions", "unknown permission"),
        ("runtime: {timeout: 10s, hard_timeout: 5s}\n", "runtime", "shorter"),
    ],
)
def test_bad_settings_name_key_and_file(tmp_path: Path, text: str, key: str, words: str) -> None:
    config = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    message = str(info.value)
    assert key in message
    assert str(config) in message
    assert words in message


def test_bad_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="TOOLQ_RUNTIME__TIMEOUT"):
        load_settings(environ={"TOOLQ_RUNTIME__TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(environ={"TOOLQ_NO_SUCH_SETTING": "1"})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML at line 3"):
        load_settings(write(tmp_path, "runtime:\n  timeout: [\n"), environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="unknown profile"):
        load_settings(profile="staging", environ={})


def test_repr_hides_the_redis_password() -> None:
    settings = load_settings(environ={"TOOLQ_REDIS_URL": "redis://:hunter2@db:6379/0"})
    assert "hunter2" not in repr(settings)
    assert settings.redis_url.endswith("@db:6379/0")


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("redis://127.0.0.1:6379/0", 0),
        ("redis://:pw@db:6379/13", 13),
        ("rediss://db:6380", 0),
        ("redis://db?db=5", 5),
        ("unix:///run/redis.sock?db=2", 2),
        ("sentinel://s1:26379;sentinel://s2:26379/4", 4),
    ],
)
def test_pub_sub_channels_name_the_database_keys_do_not_need_to(url: str, database: int) -> None:
    """Redis delivers a published message to the channel's subscribers in every database:
    a project on database 3 must not hear the breaker events or cancellations of a
    project of the same name on database 5 (test processes share one Redis that way)."""
    environ = {"TOOLQ_REDIS_URL": url, "TOOLQ_NAME": "p", "TOOLQ_REDIS_SENTINEL_MASTER": "m"}
    keys = load_settings(environ=environ).keys
    first = load_settings(environ={"TOOLQ_REDIS_URL": "redis://db/0", "TOOLQ_NAME": "p"}).keys
    assert keys.breakers == first.breakers == "toolq:p:breakers"  # keys: per database anyway
    channels = (keys.breaker_events, keys.cancel_channel)
    if database == 0:
        assert channels == ("toolq:p:breaker-events", "toolq:p:cancel")
    else:
        assert channels == (f"toolq:p:db{database}:breaker-events", f"toolq:p:db{database}:cancel")


@pytest.mark.parametrize("command", [["worker"], ["run", "echo"], ["config"]])
def test_cli_exits_2_with_one_clear_message(tmp_path: Path, command: list[str]) -> None:
    config = write(tmp_path, "runtime:\n  timeout: -1s\n")
    proc = subprocess.run(
        [sys.executable, "-m", "toolq", *command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "runtime.timeout" in lines[0] and str(config) in lines[0]
