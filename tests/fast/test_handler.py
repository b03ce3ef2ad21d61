"""Call-handling policy against a fake runtime: retry, deadline, breaker, poison guard,
dead letters. Each test also has an end-to-end twin with real Bun, Redis and Celery
(tests/test_resilience.py, tests/test_worker.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fast.fakes import FakeBreakers, error, ok, rig
from toolq.workers.breaker import Admission
from toolq.workers.call.admit import DEFER_SLACK_S
from toolq.workers.call.attempt import Delivery, Final, Retry
from toolq.workers.call.guard import MAX_DELIVERIES
from toolq.workers.runtime.base import Call, Outcome

DELIVERY = Delivery("call-1", "worker-a", "toolq")


def message(tool_id: str = "echo", enqueued_at: float = 1_000_000.0, **extra: Any) -> Any:
    return {"tool_id": tool_id, "input": {"x": 1}, "env": {}, "enqueued_at": enqueued_at, **extra}


def final(decision: object) -> dict[str, Any]:
    assert isinstance(decision, Final), decision
    return decision.envelope


def test_success_is_final_and_counts_for_the_tool() -> None:
    r = rig([ok({"v": 1})])
    envelope = final(r.handler.handle(message(), DELIVERY))
    assert envelope["status"] == "success" and envelope["result"] == {"v": 1}
    assert envelope["metadata"]["attempts"] == 1
    assert r.breakers.verdicts == [("echo", "success")]
    assert r.dead_letters.entries == []


def test_a_retryable_failure_is_retried_with_the_policy_delay() -> None:
    r = rig([error("crashed")], {"backoff_initial_interval": "100ms"})
    decision = r.handler.handle(message(), DELIVERY)
    assert isinstance(decision, Retry)
    assert decision.delay_s == pytest.approx(0.1)  # jitter off: exactly the policy's
    assert decision.request.attempt == 2
    assert decision.request.history[0]["kind"] == "crashed"
    assert decision.request.history[0]["worker"] == "worker-a"
    assert r.dead_letters.entries == []


def test_the_last_attempt_is_final_and_dead_lettered() -> None:
    r = rig([error("crashed")], {"max_attempts": 3})
    envelope = final(r.handler.handle(message(attempt=3, history=[{}, {}]), DELIVERY))
    assert envelope["error"]["kind"] == "crashed"
    assert envelope["metadata"]["retry_stopped"] == "max_attempts"
    assert envelope["metadata"]["attempts"] == 3
    (entry,) = r.dead_letters.entries
    assert entry["id"] == "call-1" and entry["input"] == {"x": 1} and entry["queue"] == "toolq"


def test_no_attempt_is_scheduled_after_the_deadline() -> None:
    r = rig([error("timeout")], {"backoff_max_elapsed_time": "10s"})
    r.clock.now += 9.95  # 50 ms left; the next delay would be 100 ms
    envelope = final(r.handler.handle(message(), DELIVERY))
    assert envelope["metadata"]["retry_stopped"] == "deadline"


@pytest.mark.parametrize(
    ("outcome", "settings", "extra", "stop", "verdict"),
    [
        (error("not_found"), {}, {}, "not_retryable", None),
        (error("tool_error"), {}, {}, "not_retryable", "failure"),  # a plain thrown Error
        (error("tool_error", retryable=False), {}, {}, "not_retryable", None),
        (error("tool_error", "BadCity"), {"non_retryable_errors": ["BadCity"]}, {}, None, None),
        (error("crashed"), {}, {"retry": {"enabled": False}}, "disabled", "failure"),
        (error("crashed"), {}, {"retry": {"max_attempts": 1}}, "max_attempts", "failure"),
    ],
)
def test_what_is_not_retried(
    outcome: Outcome,
    settings: dict[str, Any],
    extra: dict[str, Any],
    stop: str | None,
    verdict: str | None,
) -> None:
    r = rig([outcome], settings)
    envelope = final(r.handler.handle(message(**extra), DELIVERY))
    assert envelope["metadata"]["retry_stopped"] == (stop or "not_retryable")
    assert len(r.runtime.calls) == 1
    assert r.breakers.verdicts == ([("echo", verdict)] if verdict else [])


def test_an_open_breaker_defers_without_spending_an_attempt() -> None:
    breakers = FakeBreakers([Admission(False, "open", retry_in_s=2.0)])
    r = rig([ok()], breakers=breakers)
    decision = r.handler.handle(message(), DELIVERY)
    assert isinstance(decision, Retry)
    assert decision.delay_s == pytest.approx(2.0 + DEFER_SLACK_S)
    assert decision.request.attempt == 1
    assert decision.request.history[0]["deferred"] is True
    assert r.runtime.calls == []


def test_an_open_breaker_past_the_deadline_is_circuit_open() -> None:
    breakers = FakeBreakers([Admission(False, "open", retry_in_s=60.0)])
    r = rig([ok()], {"backoff_max_elapsed_time": "30s"}, breakers=breakers)
    envelope = final(r.handler.handle(message(), DELIVERY))
    assert envelope["error"]["kind"] == "circuit_open"
    assert envelope["metadata"]["retry_stopped"] == "deadline"
    assert r.runtime.calls == []


def test_a_breaker_that_cannot_be_reached_lets_the_call_through() -> None:
    r = rig([ok()], breakers=FakeBreakers(broken=True))
    assert final(r.handler.handle(message(), DELIVERY))["status"] == "success"
    assert r.breakers.verdicts == []  # nothing to record against


def test_a_disabled_breaker_is_never_asked() -> None:
    r = rig([error("crashed")], {"circuit_breaker": {"enabled": False}, "max_attempts": 1})
    final(r.handler.handle(message(), DELIVERY))
    assert r.breakers.verdicts == []


@pytest.mark.parametrize(
    "bad",
    [
        None,
        ["echo"],
        {"tool_id": "echo\n", "input": {}},
        {"tool_id": "echo", "input": {}, "timeout": 10_000},
        {"tool_id": "echo", "input": {}, "env": {"LD_PRELOAD": "/x.so"}},
        {"tool_id": "echo", "input": {}, "attempt": "x"},
    ],
)
def test_a_bad_message_ends_as_invalid_input_without_running(bad: Any) -> None:
    r = rig([ok()])
    envelope = final(r.handler.handle(bad, DELIVERY))
    assert envelope["error"]["kind"] == "invalid_input"
    assert envelope["id"] == "call-1"
    assert r.runtime.calls == [] and r.breakers.verdicts == []
    assert len(r.dead_letters.entries) == 1


def test_a_call_that_keeps_killing_its_worker_is_given_up() -> None:
    r = rig([ok()])
    redelivered = Delivery("call-1", "worker-a", redelivered=True)
    decisions = [r.handler.handle(message(), redelivered) for _ in range(MAX_DELIVERIES)]
    assert [final(d)["status"] for d in decisions[:-1]] == ["success"] * (MAX_DELIVERIES - 1)
    last = final(decisions[-1])
    assert last["error"]["name"] == "WorkerLost"
    assert last["metadata"]["retry_stopped"] == "max_deliveries"
    assert len(r.runtime.calls) == MAX_DELIVERIES - 1


def test_the_call_gets_its_tools_profile_and_its_own_timeout() -> None:
    seen: list[Call] = []

    def record(call: Call) -> Outcome:
        seen.append(call)
        return ok()

    settings = {
        "tools": {
            "echo": {"timeout": "20s", "hard_timeout": "30s", "limits": {"max_memory_mb": 64}}
        }
    }
    r = rig(record, settings)
    final(r.handler.handle(message(timeout=5), DELIVERY))
    (call,) = seen
    assert (call.time_limits.timeout_s, call.time_limits.hard_timeout_s) == (5, 15)  # grace kept
    assert call.resources.max_memory_mb == 64
    assert call.mode == "spawn"  # own limits: not in a shared warm process
    assert call.tool_exec_id == "call-1"


def test_celerys_backstop_ends_the_call_as_a_timeout() -> None:
    r = rig([ok()])
    envelope = r.handler.backstop_timeout(message(), DELIVERY).envelope
    assert envelope["error"]["kind"] == "timeout"
    assert len(r.dead_letters.entries) == 1


# -- breaker accounting: one verdict per call ----------------------------------------------


def test_a_call_counts_once_against_its_tool_whatever_its_attempts() -> None:
    settings = {"tools": {"echo": {"retry": {"retryable_errors": ["Error"], "max_attempts": 3}}}}
    r = rig([error("tool_error")], settings)
    first = r.handler.handle(message(), DELIVERY)
    assert isinstance(first, Retry) and first.request.counted
    second = r.handler.handle(first.request.to_message(), DELIVERY)
    assert isinstance(second, Retry)
    final(r.handler.handle(second.request.to_message(), DELIVERY))
    assert r.breakers.verdicts == [("echo", "failure")]  # three attempts, one verdict


def test_a_half_open_probe_always_reports_its_verdict() -> None:
    probe = Admission(True, "half-open", probe="lease-1")
    r = rig([ok()], breakers=FakeBreakers([probe]))
    final(r.handler.handle(message(counted=True, attempt=2, history=[{}]), DELIVERY))
    assert r.breakers.verdicts == [("echo", "success")]


@pytest.mark.parametrize(
    ("outcome", "settings", "timeout", "verdict"),
    [
        (error("tool_error"), {}, None, "failure"),
        (error("tool_error", retryable=False), {}, None, None),  # the caller's fault
        (error("tool_error", "BadCity"), {"non_retryable_errors": ["BadCity"]}, None, None),
        (error("timeout"), {}, None, "failure"),
        (error("timeout"), {}, 1.0, None),  # the caller shortened the tool's limit
        (error("timeout"), {"runtime": {"timeout": "2s"}}, 3.0, "failure"),  # lengthened
        (error("crashed"), {}, None, "failure"),
        (error("not_found"), {}, None, None),
        (error("memory_exceeded"), {}, None, None),
    ],
)
def test_what_counts_against_a_tool(
    outcome: Outcome, settings: dict[str, Any], timeout: float | None, verdict: str | None
) -> None:
    r = rig([outcome], {"max_attempts": 1, **settings})
    extra = {"timeout": timeout} if timeout is not None else {}
    final(r.handler.handle(message(**extra), DELIVERY))
    assert r.breakers.verdicts == ([("echo", verdict)] if verdict else [])


def test_a_call_ends_with_its_own_failure_not_the_breaker_it_opened() -> None:
    own = {"attempt": 1, "kind": "timeout", "name": "TimeoutError", "message": "too slow"}
    breakers = FakeBreakers([Admission(False, "open", retry_in_s=600.0)])
    r = rig([ok()], breakers=breakers)
    envelope = final(r.handler.handle(message(attempt=2, history=[own], counted=True), DELIVERY))
    assert envelope["error"]["kind"] == "timeout" and envelope["error"]["message"] == "too slow"
    assert envelope["metadata"]["retry_stopped"] == "deadline"


def test_a_thrown_plain_error_is_not_retried_unless_it_says_so() -> None:
    assert final(rig([error("tool_error")]).handler.handle(message(), DELIVERY))
    says_so = rig([error("tool_error", retryable=True)]).handler.handle(message(), DELIVERY)
    assert isinstance(says_so, Retry)
    listed = rig([error("tool_error", "FetchError")], {"retryable_errors": ["FetchError"]})
    assert isinstance(listed.handler.handle(message(), DELIVERY), Retry)
