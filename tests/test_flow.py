"""Flow control end to end: several real worker processes on one Redis, real Bun.

Overlaps and rates are counted from the tools' own start/end stamps (tests/tools
``stamp``), never from tight wall-clock asserts: other suites share these 2 cores.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import StartWorker, wait_until
from tests.test_resilience import runs, toolq
from toolq import QueueFull, ToolClient
from toolq.cli.meters import count_commands
from toolq.cli.status import flow_status
from toolq.config.celery_app import queue_lists
from toolq.workers.assembly import build_worker
from toolq.workers.call.attempt import Delivery, Final
from toolq.workers.flow import LEASE_MARGIN_S


def stamps(log: Path) -> list[tuple[str, str, float]]:
    """(event, tag, seconds) lines the tool wrote, in file order."""
    if not log.exists():
        return []
    lines = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return [(event, tag, int(ms) / 1000) for event, tag, ms in lines]


def starts(log: Path) -> list[tuple[str, float]]:
    return sorted(
        ((tag, at) for event, tag, at in stamps(log) if event == "start"), key=lambda s: s[1]
    )


def max_overlap(log: Path, tags: set[str] | None = None) -> int:
    """Most calls running at once, from their start and end stamps (an end at the same
    millisecond as a start counts first: the slot was free)."""
    events = sorted(
        (at, 0 if event == "end" else 1)
        for event, tag, at in stamps(log)
        if tags is None or tag in tags
    )
    running = peak = 0
    for _, is_start in events:
        running += 1 if is_start else -1
        peak = max(peak, running)
    return peak


def shared_queue() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


# -- cluster-wide concurrency ---------------------------------------------------------------


def test_the_cap_holds_across_workers_and_waiters_start_in_arrival_order(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue, log = shared_queue(), tmp_path / "log"
    for _ in range(3):  # 3 workers x 2 slots: 6 could run, the cap is 2
        start_worker(queues=[queue], concurrency=2)
    holders = [
        client.enqueue("capped", {"log": str(log), "ms": 1500, "tag": f"h{i}"}, queue=queue)
        for i in range(2)
    ]
    assert wait_until(lambda: len(starts(log)) == 2, 30)
    waiters = [
        client.enqueue("capped", {"log": str(log), "ms": 200, "tag": str(i)}, queue=queue)
        for i in range(8)
    ]
    results = [call.result(timeout=90) for call in holders + waiters]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert max_overlap(log) == 2  # never more, and the cap was used
    assert all(r.metadata.get("flow_waits") for r in results[2:])
    order = [int(tag) for tag, _ in starts(log) if not tag.startswith("h")]
    # Arrival order: a free slot goes to one of the first `free` waiters (free <= 2), so a
    # call may pass at most one that arrived before it, never two.
    for position, tag in enumerate(order):
        passed = [earlier for earlier in order[position + 1 :] if earlier < tag]
        assert len(passed) <= 1, order
    assert order != sorted(order, reverse=True)


def test_the_cap_holds_per_key(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue, log = shared_queue(), tmp_path / "log"
    for _ in range(2):
        start_worker(queues=[queue], concurrency=3)
    calls = [
        client.enqueue(
            "capped_per_key",
            {"log": str(log), "ms": 300, "tag": f"{customer}{i}", "customer": customer},
            queue=queue,
        )
        for i in range(3)
        for customer in "abc"
    ]
    assert all(call.result(timeout=90).ok for call in calls)
    for customer in "abc":
        assert max_overlap(log, {f"{customer}{i}" for i in range(3)}) == 1
    assert max_overlap(log) >= 2  # different customers ran side by side


def test_a_waiting_call_does_not_block_another_tool_on_its_worker(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    holder_queue, waiter_queue, log = shared_queue(), shared_queue(), tmp_path / "log"
    start_worker(queues=[holder_queue], concurrency=1)
    start_worker(queues=[waiter_queue], concurrency=1)  # one slot only
    holder = client.enqueue(
        "capped_one", {"log": str(log), "ms": 3000, "tag": "holder"}, queue=holder_queue
    )
    assert wait_until(lambda: bool(starts(log)), 30)
    waiter = client.enqueue(
        "capped_one", {"log": str(log), "ms": 0, "tag": "waiter"}, queue=waiter_queue
    )
    time.sleep(0.5)  # the waiter has been re-published at least once by now
    assert waiter.state() == "RETRY"  # what Flower shows too: waiting, not running
    other = client.run("echo", {"hi": 1}, queue=waiter_queue, wait=30)
    finished_other = time.time()
    assert other.ok
    assert waiter.result(timeout=60).ok and holder.result(timeout=60).ok
    waiter_start = dict(starts(log))["waiter"]
    holder_end = next(at for event, tag, at in stamps(log) if (event, tag) == ("end", "holder"))
    assert finished_other < waiter_start  # echo ran on the one slot while the waiter waited
    assert waiter_start >= holder_end


def test_a_killed_workers_slot_comes_back_within_its_lease(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    first_queue, second_queue, log = shared_queue(), shared_queue(), tmp_path / "log"
    doomed = start_worker(queues=[first_queue], concurrency=1)
    start_worker(queues=[second_queue], concurrency=1)
    # capped_lease: hard limit 2s, so a slot is leased for 2s + margin
    client.enqueue("capped_lease", {"log": str(log), "ms": 800, "tag": "lost"}, queue=first_queue)
    assert wait_until(lambda: bool(starts(log)), 30)
    doomed.kill()  # SIGKILL: nobody gives the slot back
    killed_at = time.time()
    second = client.enqueue(
        "capped_lease", {"log": str(log), "ms": 0, "tag": "next"}, queue=second_queue
    )
    assert second.result(timeout=60).ok
    lost_start = dict(starts(log))["lost"]
    next_start = dict(starts(log))["next"]
    lease = 2.0 + LEASE_MARGIN_S
    assert next_start >= lost_start + lease - 0.2  # it did wait for the lease (not free)
    assert next_start <= killed_at + lease + 5.0  # and got the slot once the lease ran out


# -- rate -----------------------------------------------------------------------------------


def test_the_rate_limit_holds_across_workers(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue, log = shared_queue(), tmp_path / "log"
    for _ in range(2):
        start_worker(queues=[queue], concurrency=3)
    calls = [
        client.enqueue("rated", {"log": str(log), "tag": str(i)}, queue=queue) for i in range(12)
    ]
    assert all(call.result(timeout=90).ok for call in calls)
    times = [at for _, at in starts(log)]
    assert len(times) == 12
    interval = 1 / 5  # rated: 5/s
    # tokens are spaced by the interval and no call starts before its token's time
    assert times[-1] - times[0] >= 11 * interval - 0.05
    window = 1.0
    for i, t in enumerate(times):
        in_window = sum(1 for u in times[i:] if u < t + window)
        assert in_window <= 5 + 2, times  # 5/s, with slack for late re-deliveries
    assert times[-1] - times[0] <= 11 * interval + 8  # and it did not crawl either


def test_reject_mode_refuses_the_excess_as_rate_limited(
    client: ToolClient, worker: Any, tmp_path: Path, redis_url: str
) -> None:
    log = tmp_path / "log"
    first = client.run("rated_reject", {"log": str(log)}, wait=30)
    second = client.run("rated_reject", {"log": str(log)}, wait=30)
    assert first.ok
    assert second.error is not None and second.error.kind == "rate_limited"
    assert second.metadata["attempts"] == 1
    assert len(starts(log)) == 1  # Bun never ran for the refused call
    assert toolq(redis_url, "dlq", "list", "--json").stdout.count(second.id) == 0


# -- priorities -----------------------------------------------------------------------------


def test_an_urgent_call_overtakes_a_backlog(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue, log = shared_queue(), tmp_path / "log"
    start_worker(queues=[queue], concurrency=1)
    client.enqueue("stamp", {"log": str(log), "ms": 1500, "tag": "blocker"}, queue=queue)
    assert wait_until(lambda: bool(starts(log)), 30)
    backlog = [
        client.enqueue("stamp", {"log": str(log), "ms": 50, "tag": f"low{i}"}, queue=queue)
        for i in range(8)
    ]
    urgent = client.enqueue(
        "stamp", {"log": str(log), "ms": 50, "tag": "urgent"}, queue=queue, priority=9
    )
    assert urgent.result(timeout=60).ok and all(c.result(timeout=60).ok for c in backlog)
    order = [tag for tag, _ in starts(log)]
    assert order[0] == "blocker"
    # the worker may already hold one call it fetched before the urgent one was sent
    assert order.index("urgent") <= 2, order
    assert order[1:].count("urgent") == 1 and order[-1] != "urgent"


def test_an_urgent_call_overtakes_the_waiters_of_a_capped_tool(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Issue 22: a priority-9 call to a capped tool started after all 12 earlier waiters of
    priority 0 (the waiting list was ordered by first enqueue only)."""
    queue, log = shared_queue(), tmp_path / "log"
    for _ in range(2):
        start_worker(queues=[queue], concurrency=4)
    backlog = [
        client.enqueue("capped", {"log": str(log), "ms": 300, "tag": f"low{i}"}, queue=queue)
        for i in range(12)
    ]
    assert wait_until(lambda: len(starts(log)) >= 2, 30)  # the waiting list has formed
    urgent = client.enqueue(
        "capped", {"log": str(log), "ms": 300, "tag": "urgent"}, queue=queue, priority=9
    )
    results = [call.result(timeout=90) for call in [urgent, *backlog]]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    order = [tag for tag, _ in starts(log)]
    assert max_overlap(log) == 2
    # before it: at most the calls running or holding a slot when it came (2, and one
    # whose grant was on its way)
    assert len(order) - 1 - order.index("urgent") >= 9, order


def test_an_urgent_call_overtakes_the_reserved_tokens_of_a_rated_tool(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path, redis_url: str
) -> None:
    """Issue 22: a priority-9 call over a tool's rate reserved the token after every
    earlier reservation; it now takes the first token a less urgent call holds."""
    queue, log = shared_queue(), tmp_path / "log"
    for _ in range(2):
        start_worker(queues=[queue], concurrency=3)
    backlog = [
        client.enqueue("rated", {"log": str(log), "tag": f"low{i}"}, queue=queue) for i in range(15)
    ]
    reserved = client.settings.keys.rate_waiting("rated")
    with redis.Redis.from_url(redis_url) as store:
        # every call but the first holds a future token (rated is 5/s: 15 span 2.8 s)
        assert wait_until(lambda: store.zcard(reserved) >= 12, 30)
    urgent = client.enqueue("rated", {"log": str(log), "tag": "urgent"}, queue=queue, priority=9)
    results = [call.result(timeout=90) for call in [urgent, *backlog]]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    order = [tag for tag, _ in starts(log)]
    # before it: only the calls whose token's time had come (it went last before)
    assert len(order) - 1 - order.index("urgent") >= 7, order


# -- cancel ---------------------------------------------------------------------------------


def test_a_cancelled_queued_call_never_runs(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path, redis_url: str
) -> None:
    queue, log = shared_queue(), tmp_path / "log"
    call = client.enqueue("stamp", {"log": str(log), "tag": "queued"}, queue=queue)
    cancelled = toolq(redis_url, "cancel", call.id)
    assert cancelled.returncode == 0, cancelled.stderr
    result = call.result(timeout=5)  # at once: no worker has seen it yet
    assert result.error is not None and result.error.kind == "cancelled"
    start_worker(queues=[queue], concurrency=1)
    assert wait_until(lambda: client.queue_length(queue) == 0, 30)
    time.sleep(1.0)
    assert starts(log) == []
    assert client.call(call.id).result(timeout=5).error.kind == "cancelled"  # type: ignore[union-attr]
    assert toolq(redis_url, "cancel", call.id).returncode == 1  # finished: nothing to do


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_running_call_is_stopped_sigterm_then_sigkill(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path, pool: str
) -> None:
    queue, pidfile = shared_queue(), tmp_path / "signals"
    start_worker(queues=[queue], concurrency=1, pool=pool)  # prefork: the child subscribes
    pidfile.touch()
    pidfile.chmod(0o666)  # the tool runs as the sandbox's unprivileged uid
    # ignores SIGTERM; soft limit 6s for this call, the tool's grace (1s) before SIGKILL
    call = client.enqueue("ignore_sigterm", {"pidfile": str(pidfile)}, timeout=6, queue=queue)
    assert wait_until(lambda: "started" in pidfile.read_text(), 30)  # it is running
    asked = time.monotonic()
    assert call.cancel() == "cancelled"
    assert call.result(timeout=5).error.kind == "cancelled"  # type: ignore[union-attr]
    assert time.monotonic() - asked < 1.0  # the caller did not wait for the worker
    # the worker's own envelope replaces the first one once Bun is gone
    assert wait_until(lambda: "sigterm" in pidfile.read_text(), 10)

    def worker_done() -> bool:
        meta = client.call(call.id).result(timeout=5).metadata
        return "worker" in meta

    assert wait_until(worker_done, 10)
    final = client.call(call.id).result(timeout=5)
    assert final.error is not None and final.error.kind == "cancelled"
    assert final.metadata["attempts"] == 1
    ran_ms = final.metadata["total_time"]
    assert 1000 <= ran_ms < 6000  # stopped before its soft limit; SIGKILL after the grace


def test_a_cancelled_retry_is_dropped(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path
) -> None:
    queue, counter = shared_queue(), tmp_path / "runs"
    start_worker(queues=[queue], concurrency=1)
    call = client.enqueue("slow_retry", {"counter": str(counter)}, queue=queue)
    assert wait_until(lambda: len(runs(counter)) == 1, 30)  # failed once; retry in 4s
    time.sleep(0.3)
    call.cancel()
    assert call.result(timeout=5).error.kind == "cancelled"  # type: ignore[union-attr]
    time.sleep(5.5)  # past the retry's countdown
    assert len(runs(counter)) == 1


# -- cache ----------------------------------------------------------------------------------


def test_cache_hit_bypass_env_and_errors(
    client: ToolClient, worker: Any, tmp_path: Path, redis_url: str
) -> None:
    log, tag = tmp_path / "log", uuid.uuid4().hex
    first = client.run("cached", {"log": str(log), "t": tag}, env={"API_TOKEN": "s3cret"}, wait=30)
    again = client.run("cached", {"log": str(log), "t": tag}, env={"API_TOKEN": "other"}, wait=30)
    bypass = client.run("cached", {"log": str(log), "t": tag}, cache=False, wait=30)
    assert first.ok and again.ok and bypass.ok
    assert again.result == first.result and again.metadata["cached"] is True
    assert again.metadata["cached_from"] == first.id
    assert bypass.result != first.result and "cached" not in bypass.metadata
    assert len(starts(log)) == 2  # Bun ran for the first call and the bypass only
    store = redis.Redis.from_url(redis_url)
    try:
        values = [store.get(key) for key in store.scan_iter("toolq:*cache:*")]
    finally:
        store.close()
    assert values and not any(b"s3cret" in (v or b"") for v in values)
    failing = [client.run("cached", {"log": str(log), "fail": True}, wait=30) for _ in range(2)]
    assert all(r.error is not None for r in failing) and len(starts(log)) == 4
    payload = json.dumps({"log": str(log), "t": tag})
    via_cli = toolq(redis_url, "run", "cached", "--input", payload, "--no-cache", "--priority", "3")
    assert via_cli.returncode == 0, via_cli.stderr
    envelope = json.loads(via_cli.stdout)
    assert "cached" not in envelope["metadata"] and envelope["metadata"]["priority"] == 3
    assert len(starts(log)) == 5
    cached_cli = json.loads(toolq(redis_url, "run", "cached", "--input", payload).stdout)
    assert cached_cli["metadata"]["cached"] is True
    assert toolq(redis_url, "run", "cached", "--priority", "10").returncode == 2


# -- backpressure ---------------------------------------------------------------------------


def test_a_full_queue_refuses_or_blocks(client: ToolClient, redis_url: str, tmp_path: Path) -> None:
    queue = "toolq-test-full"  # capped at 3 in tests/tools/compozy.yaml; no worker reads it
    store = redis.Redis.from_url(redis_url)
    try:
        store.delete(*queue_lists(queue))  # other tests of this test process fill it too
        for _ in range(3):
            client.enqueue("echo", {}, queue=queue)
        with pytest.raises(QueueFull) as refused:
            client.enqueue("echo", {}, queue=queue)
        assert refused.value.cap == 3 and refused.value.length == 3
        assert client.queue_length(queue) == 3  # nothing was added
        began = time.monotonic()
        with pytest.raises(QueueFull):
            client.enqueue("echo", {}, queue=queue, block=0.5)
        assert time.monotonic() - began >= 0.5
        cli = toolq(redis_url, "enqueue", "echo", "--queue", queue)
        assert cli.returncode == 2 and "full" in cli.stderr
        # room appears while a producer blocks: it enqueues then
        threading.Timer(0.3, lambda: [store.rpop(name) for name in queue_lists(queue)]).start()
        client.enqueue("echo", {}, queue=queue, block=10)
        assert client.queue_length(queue) <= 3
    finally:
        store.delete(*queue_lists(queue))
        store.close()


# -- cost -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tool_id", "commands"), [("echo", 0), ("capped", 2), ("rated", 1)])
def test_redis_commands_flow_control_adds_to_a_call(
    settings: Any, tool_id: str, commands: int, tmp_path: Path
) -> None:
    """Every Redis command the handler sends for one call, counted at the client: none
    for a tool without flow control, acquire + release for a cap, one token for a rate."""
    parts = build_worker(settings, max_concurrent=1)
    try:
        handler = parts.handler
        handler.handle({"tool_id": "echo", "input": {}}, Delivery("warm-up", "w"))
        sent = count_commands(parts)
        body = {"tool_id": tool_id, "input": {"log": str(tmp_path / "log")}, "env": {}}
        decision = handler.handle({**body, "enqueued_at": time.time()}, Delivery("c1", "w"))
        assert isinstance(decision, Final) and decision.envelope["status"] == "success"
        assert len(sent) == commands, sent
    finally:
        parts.close()


def test_status_shows_slots_waiters_and_queue_caps(
    client: ToolClient, start_worker: StartWorker, tmp_path: Path, redis_url: str
) -> None:
    queue, log = shared_queue(), tmp_path / "log"
    start_worker(queues=[queue], concurrency=3)
    calls = [
        client.enqueue("capped_one", {"log": str(log), "ms": 2500, "tag": str(i)}, queue=queue)
        for i in range(3)
    ]
    assert wait_until(lambda: bool(starts(log)), 30)
    report: dict[str, Any] = {}

    def capped_one() -> dict[str, Any]:
        """The tool's slot line in what `toolq status` shows (read again each time)."""
        with redis.Redis.from_url(redis_url) as store:
            report.update(flow_status(store, client.settings))
        return next((s for s in report["slots"] if s["tool_id"] == "capped_one"), {})

    assert wait_until(lambda: capped_one().get("waiting") == 2, 10)  # both asked by now
    slots = {s["tool_id"]: s for s in report["slots"]}
    assert slots["capped_one"] == {
        "tool_id": "capped_one",
        "key": None,
        "in_use": 1,
        "limit": 1,
        "waiting": 2,
    }
    assert {r["tool_id"]: r["mode"] for r in report["rate"]}["rated_reject"] == "reject"
    cli = toolq(redis_url, "status", "--json")
    assert cli.returncode == 0, cli.stderr
    full = json.loads(cli.stdout)
    assert "slots" in full["flow"]
    assert next(q for q in full["queues"] if q["name"] == "toolq-test-full")["cap"] == 3
    text = toolq(redis_url, "status").stdout
    assert "capped_one" in text and "waiting for a token" in text
    assert all(call.result(timeout=60).ok for call in calls)


# -- the Lua scripts, straight against Redis -----------------------------------------------


@pytest.fixture
def flow(redis_url: str) -> Any:
    from toolq.keys import Keys
    from toolq.workers.flow import Flow

    store = redis.Redis.from_url(redis_url)
    keys = Keys(f"scripts-{uuid.uuid4().hex[:8]}")
    yield Flow(store, keys)
    for key in store.scan_iter(f"{keys.prefix}*"):
        store.delete(key)
    store.close()


def test_slots_go_to_waiters_in_arrival_order(flow: Any) -> None:
    def take(holder: str, arrival: float) -> Any:
        return flow.acquire("t", None, holder, limit=1, lease_s=30, arrival=arrival)

    assert take("a", 1.0).granted
    assert (take("late", 3.0).granted, take("late", 3.0).rank) == (False, 0)
    early = take("early", 2.0)  # arrived before "late": goes ahead of it
    assert (early.granted, early.rank, early.in_use, early.waiting) == (False, 0, 1, 2)
    assert flow.release("t", None, "a") == 0
    assert not take("late", 3.0).granted  # free, but not its turn
    assert take("early", 2.0).granted
    assert take("early", 2.0).granted  # asking again while holding it renews the lease


def test_more_urgent_waiters_go_first(flow: Any) -> None:
    def take(holder: str, arrival: float, priority: int = 0) -> Any:
        return flow.acquire(
            "t", None, holder, limit=1, lease_s=30, arrival=arrival, priority=priority
        )

    assert take("a", 1.0).granted
    assert not take("early", 2.0).granted
    urgent = take("urgent", 3.0, 9)
    assert (urgent.granted, urgent.rank) == (False, 0)
    assert take("mid", 4.0, 5).rank == 1
    assert flow.release("t", None, "a") == 0
    assert not take("early", 2.0).granted
    assert not take("mid", 4.0, 5).granted
    assert take("urgent", 3.0, 9).granted


def test_an_urgent_reservation_takes_the_first_less_urgent_token(flow: Any) -> None:
    def reserve(holder: str, priority: int = 0) -> float:
        token = flow.token("t", holder, interval_s=1.0, reserve=True, priority=priority)
        assert token.granted
        return float(token.wait_s)

    assert reserve("a") == 0
    assert reserve("b") > 0 and reserve("c") > 0
    assert reserve("u", 9) == pytest.approx(flow.confirm("t", "b") - 1.0, abs=0.25)
    assert reserve("v", 9) == pytest.approx(flow.confirm("t", "u") + 1.0, abs=0.25)
    assert reserve("w", 5) == pytest.approx(flow.confirm("t", "v") + 1.0, abs=0.25)
    # priority first, then reservation order: u, v (9), w (5), b, c (0), one second apart
    waits = [flow.confirm("t", holder) for holder in ("u", "v", "w", "b", "c")]
    assert [round(later - earlier) for earlier, later in itertools.pairwise(waits)] == [1] * 4
    assert reserve("x") == pytest.approx(waits[-1] + 1.0, abs=0.25)
    assert flow.confirm("t", "never-reserved") == 0


def test_a_lease_runs_out_on_redis_clock(flow: Any) -> None:
    assert flow.acquire("t", "k", "dead", limit=1, lease_s=0.3, arrival=1.0).granted
    assert not flow.acquire("t", "k", "next", limit=1, lease_s=5, arrival=2.0).granted
    assert flow.acquire("t", "other-key", "x", limit=1, lease_s=5, arrival=2.0).granted
    time.sleep(0.5)
    assert flow.acquire("t", "k", "next", limit=1, lease_s=5, arrival=2.0).granted


def test_a_waiter_that_stops_asking_drops_out(flow: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import toolq.workers.flow as flow_module

    monkeypatch.setattr(flow_module, "WAITER_STALE_S", 0.1)
    monkeypatch.setattr(flow_module, "SLOT_POLL_S", 0.1)
    assert flow.acquire("t", None, "a", limit=1, lease_s=30, arrival=1.0).granted
    assert not flow.acquire("t", None, "gone", limit=1, lease_s=30, arrival=2.0).granted
    flow.release("t", None, "a")
    assert not flow.acquire("t", None, "b", limit=1, lease_s=30, arrival=3.0).granted
    time.sleep(0.4)  # "gone" was due 0.1 s after it asked, + 0.1 s
    assert flow.acquire("t", None, "b", limit=1, lease_s=30, arrival=3.0).granted


def test_gcra_spaces_tokens_and_reject_reserves_nothing(flow: Any) -> None:
    began = time.monotonic()

    def spaced(wait_s: float, tokens_ahead: int) -> bool:
        """The token is ``tokens_ahead`` intervals after the first, on Redis' clock."""
        due = tokens_ahead * 0.1
        return due - (time.monotonic() - began) - 0.005 <= wait_s <= due + 0.005

    first = flow.token("t", "a", interval_s=0.1, reserve=True)
    assert first.granted and first.wait_s == 0
    assert spaced(flow.token("t", "b", interval_s=0.1, reserve=True).wait_s, 1)
    third = flow.token("t", "c", interval_s=0.1, reserve=True)
    assert spaced(third.wait_s, 2) and third.waiting == 2
    refused = flow.token("t", "d", interval_s=0.1, reserve=False)
    assert not refused.granted and spaced(refused.wait_s, 3)
    after = flow.token("t", "e", interval_s=0.1, reserve=True)
    assert spaced(after.wait_s, 3)  # the refusal took no token
    time.sleep(0.5)
    assert flow.token("t", "f", interval_s=0.1, reserve=False).granted
