"""Call signatures (toolq.signing), the remote-control allow-list (workers/control.py) and
log-safe values (toolq.logsafe), as pure functions."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from celery.worker.control import Panel
from cryptography.fernet import Fernet

from toolq.config.celery_app import RUN_BATCH_TASK, RUN_TOOL_TASK
from toolq.config.settings import Settings
from toolq.errors import ConfigError
from toolq.logsafe import Block, EscapeArgs, escape
from toolq.signing import PROJECT_HEADER, SIGNATURE_HEADER, Signer, load_signer
from toolq.workers.control import allowed_handlers

OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()
MESSAGE = {
    "tool_id": "echo",
    "input": {"city": "Oslo", "n": [1, 2.5, None, True], "é": "\u2028"},
    "env_sealed": "gAAAA…",
    "enqueued_at": 1764800000.123456,
    "config": {"units": "metric"},
    "timeout": 3.0,
    "attempt": 2,
    "history": [{"attempt": 1, "kind": "tool_error", "delay": 0.1, "at": 1764800001.5}],
}


def headers(signer: Signer, *args: Any) -> dict[str, str]:
    return signer.headers(*args)


def test_a_signature_survives_the_trip_through_json_and_covers_every_field() -> None:
    signer = Signer(NEW, "beta")
    sent = headers(signer, RUN_TOOL_TASK, "id-1", "beta", MESSAGE)
    received = json.loads(json.dumps(MESSAGE))  # what the worker reads back
    assert signer.check(RUN_TOOL_TASK, "id-1", "beta", received, sent) is None
    changed = [
        (RUN_BATCH_TASK, "id-1", "beta", MESSAGE),
        (RUN_TOOL_TASK, "id-2", "beta", MESSAGE),
        (RUN_TOOL_TASK, "id-1", "alpha", MESSAGE),
        (RUN_TOOL_TASK, "id-1", "beta", {**MESSAGE, "input": {"city": "Rome"}}),
        (RUN_TOOL_TASK, "id-1", "beta", {**MESSAGE, "env": {"K": "v"}}),
        (RUN_TOOL_TASK, "id-1", "beta", {**MESSAGE, "attempt": 1}),
        (RUN_TOOL_TASK, "id-1", "beta", {k: v for k, v in MESSAGE.items() if k != "config"}),
    ]
    for task, call_id, queue, message in changed:
        problem = signer.check(task, call_id, queue, message, sent)
        assert problem is not None and "signature refused" in problem, (task, call_id, queue)


def test_the_project_is_signed_so_a_shared_key_does_not_cross_projects() -> None:
    alpha, beta = Signer(NEW, "alpha"), Signer(NEW, "beta")
    sent = headers(alpha, RUN_TOOL_TASK, "id", "beta", MESSAGE)
    assert sent[PROJECT_HEADER] == "alpha"
    problem = beta.check(RUN_TOOL_TASK, "id", "beta", MESSAGE, sent)
    assert problem is not None and "sent for project 'alpha'" in problem
    assert "serves project 'beta'" in problem


def test_missing_and_malformed_signatures_are_refused() -> None:
    signer = Signer(NEW, "beta")
    problem = signer.check(RUN_TOOL_TASK, "id", "q", MESSAGE, {})
    assert problem is not None and problem.startswith("unsigned call refused")
    assert signer.check(RUN_TOOL_TASK, "id", "q", MESSAGE, {SIGNATURE_HEADER: 7}) is not None
    assert signer.check(RUN_TOOL_TASK, "id", "q", MESSAGE, {SIGNATURE_HEADER: "v1:00"}) is not None
    assert signer.check(RUN_TOOL_TASK, "id", "q", {"x": object()}, {SIGNATURE_HEADER: "v1:0"})


def test_rotation_the_first_key_signs_every_key_verifies() -> None:
    before, during, after = Signer(OLD, "p"), Signer(f"{NEW},{OLD}", "p"), Signer(NEW, "p")
    old_sig = headers(before, RUN_TOOL_TASK, "id", "q", MESSAGE)
    new_sig = headers(during, RUN_TOOL_TASK, "id", "q", MESSAGE)
    assert during.check(RUN_TOOL_TASK, "id", "q", MESSAGE, old_sig) is None  # queued before
    assert after.check(RUN_TOOL_TASK, "id", "q", MESSAGE, new_sig) is None  # signed with NEW
    assert after.check(RUN_TOOL_TASK, "id", "q", MESSAGE, old_sig) is not None  # rotated out


def test_the_hmac_key_is_not_the_fernet_key_and_never_shown() -> None:
    signer = Signer(NEW, "p")
    assert NEW not in repr(signer)
    with pytest.raises(ConfigError) as refused:
        Signer("not-a-key-at-all", "p")
    assert "not-a-key-at-all" not in str(refused.value) and "key 1 of 1" in str(refused.value)


def test_the_key_comes_from_the_settings_secret_key() -> None:
    assert load_signer(Settings()) is None
    signer = load_signer(Settings(secret_key=NEW, name="Weather Desk"))
    assert signer is not None and signer.project == "Weather-Desk"


def test_remote_control_keeps_read_only_commands_and_flowers_switch() -> None:
    kept = allowed_handlers(dict(Panel.data), "inspect")
    for name in ("ping", "stats", "active", "reserved", "active_queues", "registered"):
        assert name in kept
    assert "enable_events" in kept and "dump_active" in kept  # an alias of a kept command
    for name in ("shutdown", "add_consumer", "cancel_consumer", "pool_restart", "autoscale"):
        assert name not in kept
    for name in ("revoke", "terminate", "rate_limit", "time_limit", "conf", "memdump"):
        assert name not in kept
    assert allowed_handlers(dict(Panel.data), "all") == dict(Panel.data)


def test_escape_keeps_a_value_on_one_line() -> None:
    assert escape("x\ny") == "x\\ny"
    assert escape("a\r\tb\x00\x1b[31m\x7f\x85\u2028\u2029") == (
        "a\\r\\tb\\x00\\x1b[31m\\x7f\\x85\\u2028\\u2029"
    )
    assert escape("plain café ✓") == "plain café ✓"


def test_the_filter_escapes_every_argument_however_it_is_formatted() -> None:
    def shown(msg: str, args: Any) -> str:
        record = logging.LogRecord("toolq.worker", logging.INFO, __file__, 1, msg, args, None)
        EscapeArgs().filter(record)
        return record.getMessage()

    assert shown("call %s %s: %d ms", ("id", "x\ny", 5)) == "call id x\\ny: 5 ms"
    assert shown("%r", (ValueError("a\nb"),)) == "ValueError('a\\nb')"
    assert shown("%s", (ValueError("a\nb"),)) == "a\\nb"
    assert shown("Task %(name)s received", ({"name": "toolq:x\ny"},)) == (
        "Task toolq:x\\ny received"
    )
    assert shown("%.1f", (0.25,)) == "0.2"
    block = shown("stderr:\n%s", (Block("one\ntwo\x1b[2J"),))
    assert block == "stderr:\n  | one\n  | two\\x1b[2J"
