"""Flow-control policy against fakes: slots, rate tokens, cancel, cache, priorities,
settings. The end-to-end twins are in tests/test_flow.py (real Redis, workers, Bun)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tests.fast.fakes import FakeFlow, ok, rig
from toolq.config.settings import Settings, parse_rate
from toolq.errors import InvalidInput
from toolq.protocol import CallRequest, new_request, validate
from toolq.workers.call.attempt import Delivery, Final, Retry
from toolq.workers.flow import (
    LEASE_MARGIN_S,
    MAX_SLOT_POLL_S,
    SLOT_POLL_S,
    FlowLimits,
    slot_poll_s,
    waiter_order,
)
from toolq.workers.runtime.base import Call, Outcome

TOOLS: dict[str, Any] = {
    "tools": {
        "capped": {"max_concurrency": 1, "timeout": "3s", "hard_timeout": "4s"},
        "keyed": {"max_concurrency": 1, "concurrency_key": "input.customer.id"},
        "rated": {"rate_limit": "10/s"},
        "rated_reject": {"rate_limit": "1/m", "rate_limit_mode": "reject"},
        "both": {"rate_limit": "10/s", "max_concurrency": 1},
        "cached": {"cache": {"ttl": "60s"}},
        "cached_def": {"cache": {"ttl": "5s"}},
    }
}


def message(tool_id: str, enqueued_at: float = 1_000_000.0, **extra: Any) -> Any:
    return {"tool_id": tool_id, "input": {"x": 1}, "env": {}, "enqueued_at": enqueued_at, **extra}


def delivery(call_id: str) -> Delivery:
    return Delivery(call_id, "worker-a", "toolq")


def envelope(decision: object) -> dict[str, Any]:
    assert isinstance(decision, Final), decision
    return decision.envelope


# -- a tool without flow control costs nothing --------------------------------------------


def test_a_tool_without_flow_control_never_asks_redis() -> None:
    r = rig([ok()], TOOLS)
    envelope(r.handler.handle(message("echo"), delivery("c1")))
    assert r.flow.calls == []  # no slot, no token: no round trip at all


def test_a_capped_tool_takes_and_gives_back_one_slot() -> None:
    r = rig([ok()], TOOLS)
    envelope(r.handler.handle(message("capped"), delivery("c1")))
    assert r.flow.calls == ["acquire", "release"]
    assert r.flow.held[("capped", None)] == set()
    # the lease outlives the hard limit, so only a dead worker's slot ever expires
    assert r.flow.leases == [4.0 + LEASE_MARGIN_S]


def test_a_call_with_a_shorter_timeout_gets_a_shorter_lease() -> None:
    r = rig([ok()], TOOLS)
    envelope(r.handler.handle(message("capped", timeout=1), delivery("c1")))
    assert r.flow.leases == [1.0 + 1.0 + LEASE_MARGIN_S]  # its timeout + the tool's grace


# -- slots ----------------------------------------------------------------------------------


def test_no_free_slot_republishes_the_call_without_running_it() -> None:
    flow = FakeFlow()
    flow.held[("capped", None)] = {"someone"}
    r = rig([ok()], TOOLS, flow=flow)
    decision = r.handler.handle(message("capped"), delivery("c1"))
    assert isinstance(decision, Retry)
    assert decision.delay_s == SLOT_POLL_S
    assert decision.request.attempt == 1 and decision.request.history == ()  # not an attempt
    assert decision.request.waits == 1
    assert r.runtime.calls == []
    assert "release" not in flow.calls  # it keeps its place in the waiting list


def test_waiters_get_free_slots_in_arrival_order() -> None:
    flow = FakeFlow()
    flow.held[("capped", None)] = {"running"}
    r = rig([ok()], TOOLS, flow=flow)
    for call_id, arrived in (("late", 3.0), ("early", 1.0), ("middle", 2.0)):
        assert isinstance(r.handler.handle(message("capped", arrived), delivery(call_id)), Retry)
    flow.release("capped", None, "running")
    # the slot is free, but only the first to arrive may take it
    assert isinstance(r.handler.handle(message("capped", 3.0), delivery("late")), Retry)
    assert isinstance(r.handler.handle(message("capped", 2.0), delivery("middle")), Retry)
    envelope(r.handler.handle(message("capped", 1.0), delivery("early")))
    envelope(r.handler.handle(message("capped", 2.0), delivery("middle")))


def test_more_urgent_waiters_get_free_slots_first() -> None:
    flow = FakeFlow()
    flow.held[("capped", None)] = {"running"}
    r = rig([ok()], TOOLS, flow=flow)
    for call_id, arrived, priority in (("early", 1.0, 0), ("urgent", 3.0, 9), ("mid", 2.0, 5)):
        waiting = message("capped", arrived, priority=priority)
        assert isinstance(r.handler.handle(waiting, delivery(call_id)), Retry)
    flow.release("capped", None, "running")
    assert isinstance(r.handler.handle(message("capped", 1.0), delivery("early")), Retry)
    assert isinstance(r.handler.handle(message("capped", 2.0, priority=5), delivery("mid")), Retry)
    envelope(r.handler.handle(message("capped", 3.0, priority=9), delivery("urgent")))


def test_waiter_order_is_priority_then_arrival() -> None:
    now = 1.8e9
    assert waiter_order(9, now + 3600) < waiter_order(8, now) < waiter_order(None, now)
    assert waiter_order(0, now) < waiter_order(0, now + 1e-4) < waiter_order(0, now + 1e6)
    assert waiter_order(None, now) == waiter_order(0, now)


def test_waiters_further_back_ask_less_often() -> None:
    assert slot_poll_s(0, 2) == slot_poll_s(1, 2) == SLOT_POLL_S
    assert slot_poll_s(2, 2) == 2 * SLOT_POLL_S
    assert slot_poll_s(10_000, 2) == MAX_SLOT_POLL_S


def test_the_cap_holds_per_key_from_the_input() -> None:
    r = rig([ok()], TOOLS)
    for customer in ("a", "b"):
        body = message("keyed", input={"customer": {"id": customer}})
        envelope(r.handler.handle(body, delivery(f"c-{customer}")))
    assert set(r.flow.held) == {("keyed", "a"), ("keyed", "b")}


def test_the_slot_key_of_an_input() -> None:
    limits = FlowLimits(max_concurrency=1, key_path=("customer", "id"))
    assert limits.slot_key({"customer": {"id": "c7"}}) == "c7"
    assert limits.slot_key({"customer": {"id": 7}}) == "7"
    assert limits.slot_key({"customer": None}) == ""  # one shared bucket for calls without
    assert limits.slot_key("not an object") == ""
    assert FlowLimits(max_concurrency=1).slot_key({"x": 1}) is None


def test_the_slot_is_given_back_when_the_run_raises() -> None:
    def boom(call: Call) -> Outcome:
        raise RuntimeError("runtime bug")

    r = rig(boom, TOOLS)
    with pytest.raises(RuntimeError):
        r.handler.handle(message("capped"), delivery("c1"))
    assert r.flow.held[("capped", None)] == set()


def test_without_redis_flow_control_lets_calls_through() -> None:
    r = rig([ok()], TOOLS, flow=FakeFlow(broken=True))
    assert envelope(r.handler.handle(message("capped"), delivery("c1")))["status"] == "success"


# -- rate -----------------------------------------------------------------------------------


def test_over_the_rate_the_call_waits_exactly_for_its_reserved_token() -> None:
    flow = FakeFlow(token_wait=[0.37])
    r = rig([ok()], TOOLS, flow=flow)
    decision = r.handler.handle(message("rated"), delivery("c1"))
    assert isinstance(decision, Retry) and decision.delay_s == pytest.approx(0.37)
    assert decision.request.rate_token_at == pytest.approx(r.clock.now + 0.37)
    # back at its token's time it confirms the token (not moved) and runs: no second token
    back = decision.request.to_message()
    envelope(r.handler.handle(back, delivery("c1")))
    assert flow.calls == ["token", "confirm"]


def test_a_token_a_more_urgent_call_took_is_waited_for_again() -> None:
    flow = FakeFlow(token_wait=[0.37], moved=[0.2])
    r = rig([ok()], TOOLS, flow=flow)
    first = r.handler.handle(message("rated"), delivery("c1"))
    assert isinstance(first, Retry)
    again = r.handler.handle(first.request.to_message(), delivery("c1"))
    assert isinstance(again, Retry) and again.delay_s == pytest.approx(0.2)
    assert again.request.rate_token_at == pytest.approx(r.clock.now + 0.2)
    assert r.runtime.calls == []
    envelope(r.handler.handle(again.request.to_message(), delivery("c1")))
    assert flow.calls == ["token", "confirm", "confirm"]


def test_a_call_holding_a_token_keeps_it_while_it_waits_for_a_slot() -> None:
    flow = FakeFlow()
    flow.held[("both", None)] = {"someone"}
    r = rig([ok()], TOOLS, flow=flow)
    decision = r.handler.handle(message("both"), delivery("c1"))
    assert isinstance(decision, Retry) and decision.request.rate_token_at is not None
    flow.release("both", None, "someone")
    envelope(r.handler.handle(decision.request.to_message(), delivery("c1")))
    assert flow.calls.count("token") == 1


def test_a_retry_after_a_failure_takes_a_new_token() -> None:
    request = CallRequest("rated", rate_token_at=5.0)
    assert request.next_attempt({"kind": "crashed"}).rate_token_at is None


def test_reject_mode_ends_the_call_as_rate_limited_without_dead_letter() -> None:
    r = rig([ok()], TOOLS, flow=FakeFlow(token_wait=[12.0]))
    result = envelope(r.handler.handle(message("rated_reject"), delivery("c1")))
    assert result["error"]["kind"] == "rate_limited"
    assert result["metadata"]["attempts"] == 1 and r.runtime.calls == []
    assert r.dead_letters.entries == [] and r.breakers.verdicts == []


@pytest.mark.parametrize(
    ("text", "interval"), [("10/s", 0.1), ("600/m", 0.1), ("36/h", 100.0), (" 2 / s ", 0.5)]
)
def test_rates_parse(text: str, interval: float) -> None:
    assert parse_rate(text) == pytest.approx(interval)


@pytest.mark.parametrize("text", ["10", "10/d", "0/s", "-1/s", "ten/s", 10])
def test_bad_rates_are_refused_naming_the_key(text: Any) -> None:
    with pytest.raises(ValidationError, match="rate_limit"):
        Settings.model_validate({"tools": {"t": {"rate_limit": text}}})


def test_a_concurrency_key_needs_a_cap_and_an_input_path() -> None:
    with pytest.raises(ValidationError, match="needs max_concurrency"):
        Settings.model_validate({"tools": {"t": {"concurrency_key": "input.a"}}})
    with pytest.raises(ValidationError, match="input"):
        Settings.model_validate(
            {"tools": {"t": {"max_concurrency": 1, "concurrency_key": "env.a"}}}
        )
    with pytest.raises(ValidationError):
        Settings.model_validate({"tools": {"t": {"max_concurrency": 0}}})


# -- cancel ---------------------------------------------------------------------------------


def test_a_cancelled_call_never_runs_and_is_not_dead_lettered() -> None:
    r = rig([ok()], TOOLS)
    r.cancels.cancelled.add("c1")
    result = envelope(r.handler.handle(message("echo"), delivery("c1")))
    assert result["error"]["kind"] == "cancelled"
    assert r.runtime.calls == [] and r.dead_letters.entries == [] and r.breakers.verdicts == []
    assert r.flow.calls == []


def test_a_cancelled_waiter_leaves_the_waiting_list() -> None:
    flow = FakeFlow()
    flow.held[("capped", None)] = {"someone"}
    r = rig([ok()], TOOLS, flow=flow)
    assert isinstance(r.handler.handle(message("capped"), delivery("c1")), Retry)
    r.cancels.cancelled.add("c1")
    envelope(r.handler.handle(message("capped"), delivery("c1")))
    assert flow.waiting[("capped", None)] == {}


def test_a_running_call_gets_a_cancel_token_and_cancelled_is_final() -> None:
    def cancelled_while_running(call: Call) -> Outcome:
        assert call.cancel is not None and not call.cancel.cancelled
        call.cancel.cancel()
        from tests.fast.fakes import error

        return error("cancelled")

    r = rig(cancelled_while_running, {**TOOLS, "max_attempts": 5})
    result = envelope(r.handler.handle(message("echo"), delivery("c1")))
    assert result["error"]["kind"] == "cancelled"
    assert result["metadata"]["retry_stopped"] == "not_retryable"
    assert r.dead_letters.entries == [] and r.breakers.verdicts == []


# -- cache ----------------------------------------------------------------------------------


def test_a_cached_result_is_returned_without_running_the_tool() -> None:
    r = rig([ok({"v": 1}), ok({"v": 2})], TOOLS)
    first = envelope(r.handler.handle(message("cached"), delivery("c1")))
    second = envelope(r.handler.handle(message("cached"), delivery("c2")))
    assert first["result"] == second["result"] == {"v": 1}
    assert "cached" not in first["metadata"]
    assert second["metadata"]["cached"] is True and second["metadata"]["cached_from"] == "c1"
    assert len(r.runtime.calls) == 1 and r.cache.ttls == [60.0]


def test_env_is_not_part_of_the_cache_key_and_is_never_stored() -> None:
    r = rig([ok({"v": 1}), ok({"v": 2})], TOOLS)
    envelope(r.handler.handle(message("cached", env={"TOKEN": "s3cret"}), delivery("c1")))
    second = envelope(r.handler.handle(message("cached", env={"TOKEN": "other"}), delivery("c2")))
    assert second["metadata"]["cached"] is True
    assert "s3cret" not in repr(r.cache.entries)


def test_input_and_config_are_part_of_the_cache_key() -> None:
    r = rig([ok({"v": 1}), ok({"v": 2}), ok({"v": 3})], TOOLS)
    envelope(r.handler.handle(message("cached"), delivery("c1")))
    other_input = envelope(r.handler.handle(message("cached", input={"x": 2}), delivery("c2")))
    other_config = envelope(r.handler.handle(message("cached", config={"k": 1}), delivery("c3")))
    assert "cached" not in other_input["metadata"] and "cached" not in other_config["metadata"]


def test_cache_false_bypasses_the_cache_and_errors_are_not_cached() -> None:
    from tests.fast.fakes import error

    r = rig([error("tool_error"), ok({"v": 1}), ok({"v": 2})], TOOLS)
    envelope(r.handler.handle(message("cached"), delivery("c1")))
    assert r.cache.entries == {}
    envelope(r.handler.handle(message("cached"), delivery("c2")))
    bypass = envelope(r.handler.handle(message("cached", cache=False), delivery("c3")))
    assert bypass["result"] == {"v": 2} and "cached" not in bypass["metadata"]
    assert len(r.runtime.calls) == 3


# -- priority, backpressure settings --------------------------------------------------------


@pytest.mark.parametrize("priority", [-1, 10, 1.5, "high", True])
def test_priorities_outside_0_to_9_are_refused(priority: Any) -> None:
    with pytest.raises(InvalidInput, match="priority"):
        validate(new_request("echo", priority=priority), Settings())


def test_priority_and_cache_travel_in_the_message() -> None:
    request = validate(new_request("echo", priority=7, cache=False), Settings())
    decoded = CallRequest.from_message(request.to_message())
    assert decoded.priority == 7 and decoded.cache is False
    assert "priority" not in new_request("echo").to_message()


def test_broker_priority_puts_urgent_calls_first() -> None:
    from toolq.config.celery_app import broker_priority, queue_lists

    assert broker_priority(9) == 0 and broker_priority(None) == broker_priority(0) == 9
    assert queue_lists("q")[0] == "q" and len(queue_lists("q")) == 10


def test_queue_caps_default_and_per_queue() -> None:
    settings = Settings.model_validate({"max_queue_length": 100, "max_queue_lengths": {"slow": 5}})
    assert settings.queue_cap("slow") == 5 and settings.queue_cap("other") == 100
    assert Settings().queue_cap("toolq") is None
    with pytest.raises(ValidationError):
        Settings.model_validate({"max_queue_lengths": {"slow": 0}})


def test_metrics_count_slots_waiters_refusals_and_cache_hits() -> None:
    flow = FakeFlow(token_wait=[0.5, 9.0])
    flow.held[("capped", None)] = {"someone"}
    r = rig([ok()], TOOLS, flow=flow)
    registry = r.handler.metrics.registry
    r.handler.handle(message("capped"), delivery("c1"))
    assert registry.get_sample_value("toolq_slots_in_use", {"tool_id": "capped"}) == 1
    assert (
        registry.get_sample_value("toolq_waiting_calls", {"tool_id": "capped", "reason": "slot"})
        == 1
    )
    r.handler.handle(message("rated"), delivery("c2"))
    r.handler.handle(message("rated_reject"), delivery("c3"))
    for action in ("queued", "rejected"):
        labels = {"tool_id": "rated" if action == "queued" else "rated_reject", "action": action}
        assert registry.get_sample_value("toolq_rate_limited_total", labels) == 1
    for call_id in ("c4", "c5"):
        r.handler.handle(message("cached"), delivery(call_id))
    assert registry.get_sample_value("toolq_cache_hits_total", {"tool_id": "cached"}) == 1
