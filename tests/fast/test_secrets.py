"""Sealed env and redaction on their own: crypto, the message codec, the handler's
dead letters and envelopes, against fakes (no Redis, no Bun). End to end, with a scan
of Redis: tests/test_secrets.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tests.fast.fakes import rig
from toolq.config.loader import load_settings
from toolq.config.settings import Settings
from toolq.envelope import ToolErrorInfo
from toolq.errors import ConfigError, InvalidInput
from toolq.protocol import CallRequest, new_request, validate
from toolq.sealing import Sealer, load_sealer
from toolq.workers.call.attempt import Delivery, Final, Retry
from toolq.workers.runtime.base import Call, Outcome
from toolq.workers.runtime.secrets import redact_error, redact_secrets

KEY = Fernet.generate_key().decode()
OLD_KEY = Fernet.generate_key().decode()
SECRET = "sk-live-4f9a2b7c"
DELIVERY = Delivery("call-1", "worker-a", "toolq")


def sealed_settings(key: str = KEY, **extra: Any) -> Settings:
    return Settings.model_validate({"secret_key": key, "backoff_jitter": False, **extra})


# -- sealing ------------------------------------------------------------------------------


def test_sealed_message_carries_a_token_and_no_env() -> None:
    sealer = Sealer(KEY)
    request = validate(new_request("echo", {}, {"API_KEY": SECRET}), Settings())
    message = request.to_message(sealer)
    assert "env" not in message and SECRET not in json.dumps(message)
    decoded = CallRequest.from_message(message, sealer)
    assert decoded.env == {"API_KEY": SECRET}
    # retries and dead letters pass the token on as it came: no new encryption
    assert (
        decoded.next_attempt({"kind": "x"}).to_message(sealer)["env_sealed"]
        == (message["env_sealed"])
    )


def test_an_empty_env_is_never_sealed() -> None:
    message = validate(new_request("echo", {}), Settings()).to_message(Sealer(KEY))
    assert message["env"] == {} and "env_sealed" not in message
    assert CallRequest.from_message(message, Sealer(KEY)).env == {}


def test_a_worker_with_a_key_refuses_plain_env() -> None:
    plain = validate(new_request("echo", {}, {"API_KEY": SECRET}), Settings()).to_message()
    with pytest.raises(InvalidInput, match="plain env refused"):
        CallRequest.from_message(plain, Sealer(KEY))


@pytest.mark.parametrize(
    ("opening", "why"),
    [
        (None, "no secret_key"),
        (Fernet.generate_key().decode(), "cannot be opened"),
    ],
)
def test_a_sealed_env_needs_the_key(opening: str | None, why: str) -> None:
    message = new_request("echo", {}, {"A": "b"}).to_message(Sealer(KEY))
    with pytest.raises(InvalidInput, match=why):
        CallRequest.from_message(message, Sealer(opening) if opening else None)


def test_a_token_altered_in_redis_does_not_open() -> None:
    message = new_request("echo", {}, {"A": "b"}).to_message(Sealer(KEY))
    token = message["env_sealed"]
    message["env_sealed"] = token[:-8] + ("A" if token[-8] != "A" else "B") + token[-7:]
    with pytest.raises(InvalidInput, match="cannot be opened"):
        CallRequest.from_message(message, Sealer(KEY))


def test_rotation_new_key_first_opens_old_tokens() -> None:
    old_token = new_request("echo", {}, {"A": "b"}).to_message(Sealer(OLD_KEY))
    rotated = Sealer(f"{KEY}, {OLD_KEY}")
    assert CallRequest.from_message(old_token, rotated).env == {"A": "b"}
    new_token = new_request("echo", {}, {"A": "b"}).to_message(rotated)
    assert CallRequest.from_message(new_token, Sealer(KEY)).env == {"A": "b"}  # sealed with KEY
    with pytest.raises(InvalidInput):
        CallRequest.from_message(new_token, Sealer(OLD_KEY))


def test_a_malformed_key_is_a_config_error_that_never_shows_the_key() -> None:
    with pytest.raises(ConfigError, match="key 2 of 2 is not a Fernet key") as raised:
        Sealer(f"{KEY},not-a-real-key-but-secret")
    assert "not-a-real-key-but-secret" not in str(raised.value)


def test_the_key_is_read_from_the_environment_or_a_file_never_printed(tmp_path: Path) -> None:
    settings = load_settings(environ={"TOOLQ_SECRET_KEY": KEY})
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump(mode="json"))
    assert load_sealer(settings) is not None
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    config = tmp_path / "compozy.yaml"
    config.write_text("secret_key_file: ./key\n")
    sealer = load_sealer(load_settings(config, environ={}))
    assert sealer is not None and sealer.unseal(Sealer(KEY).seal({"A": "1"})) == {"A": "1"}
    assert load_sealer(load_settings(environ={})) is None


def test_a_key_written_in_a_yaml_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "compozy.yaml"
    config.write_text(f"secret_key: {KEY}\n")
    with pytest.raises(ConfigError, match="secret_key: not allowed in a file") as raised:
        load_settings(config, environ={})
    assert KEY not in str(raised.value)


# -- the handler: sealed dead letters, redacted envelopes ---------------------------------


def throws_env(call: Call) -> Outcome:
    """A tool that throws its env value, prints it and puts it in its stack."""
    value = call.env["API_KEY"]
    info = ToolErrorInfo(
        "tool_error", f"bad key {value}", "Error", f"Error: bad key {value}\n    at tool"
    )
    return Outcome(None, info, 1, 2, stderr=f"[LOG] using {value}\n")


def test_with_a_key_dead_letters_keep_the_env_sealed() -> None:
    r = rig(throws_env, {"secret_key": KEY, "max_attempts": 1})
    r.handler.sealer = Sealer(KEY)
    message = new_request("echo", {}, {"API_KEY": SECRET}).to_message(Sealer(KEY))
    envelope = final(r.handler.handle(message, DELIVERY))
    (entry,) = r.dead_letters.entries
    assert "env" not in entry and entry["env_sealed"] == message["env_sealed"]
    assert SECRET not in json.dumps(entry) + json.dumps(envelope)


def test_a_refused_plain_env_is_dead_lettered_sealed() -> None:
    r = rig(throws_env)
    r.handler.sealer = Sealer(KEY)
    envelope = final(
        r.handler.handle(new_request("echo", {}, {"API_KEY": SECRET}).to_message(), DELIVERY)
    )
    assert envelope["error"]["kind"] == "invalid_input"
    assert "plain env refused" in envelope["error"]["message"]
    (entry,) = r.dead_letters.entries
    assert "env" not in entry and Sealer(KEY).unseal(entry["env_sealed"]) == {"API_KEY": SECRET}
    assert r.runtime.calls == []  # the tool never ran


@pytest.mark.parametrize("value", [SECRET, "xy", "7"])
def test_env_values_are_redacted_from_every_error_field_and_history(value: str) -> None:
    r = rig(throws_env, {"max_attempts": 2, "retryable_errors": ["Error"]})
    message = new_request("echo", {}, {"API_KEY": value}).to_message()
    retry = r.handler.handle(message, DELIVERY)
    assert isinstance(retry, Retry)
    assert retry.request.history[0]["message"] == "bad key ***"
    envelope = final(r.handler.handle(retry.request.to_message(), DELIVERY))
    error = envelope["error"]
    assert error["message"] == "bad key ***" and "bad key ***" in error["stack"]
    assert envelope["metadata"]["attempt_history"][0]["message"] == "bad key ***"
    (entry,) = r.dead_letters.entries
    assert entry["error"]["message"] == "bad key ***"


def final(decision: object) -> dict[str, Any]:
    assert isinstance(decision, Final), decision
    return decision.envelope


# -- redaction rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("token=abc123;", {"T": "abc123"}, "token=***;"),
        ("inside-xabc123x-too", {"T": "abc123"}, "inside-x***x-too"),  # long: anywhere
        ("key=ab ok", {"T": "ab"}, "key=*** ok"),  # short: as a token
        ("table cab ab.", {"T": "ab"}, "table cab ***."),  # ... not inside words
        ("retry 1 of 10", {"N": "1"}, "retry *** of 10"),
        ('{"k":"a\\"b c"}', {"T": 'a"b c'}, '{"k":"***"}'),  # as printed inside JSON
        ('{"k":"caf\\u00e9!"}', {"T": "café!"}, '{"k":"***"}'),
        ("abcdef", {"A": "abc", "B": "abcdef"}, "***"),  # the longer value wins
        ("nothing here", {"A": ""}, "nothing here"),  # an empty value hides nothing
    ],
)
def test_redaction_rules(text: str, env: dict[str, str], expected: str) -> None:
    assert redact_secrets(text, env) == expected


def test_redacting_twice_changes_nothing() -> None:
    env = {"A": "*", "B": "ab", "C": "sec"}
    once = redact_secrets("a * ab sec", env)
    assert redact_secrets(once, env) == once == "a * *** ***"


def test_redact_error_covers_name_message_stack_and_stderr() -> None:
    info = ToolErrorInfo("tool_error", "m sec", "N sec", "S sec", "E sec")
    redacted = redact_error(info, {"A": "sec"}).to_dict()
    assert "sec" not in json.dumps(redacted)
