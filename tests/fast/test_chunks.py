"""The chunk runner's policy against fakes: every call ends once (stored, or handed on),
within the chunk's time budget, over the slots that are free. Behaviour with real
workers, Redis and Bun: ``tests/test_batch.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from tests.fast.fakes import error, ok, rig
from toolq.errors import InvalidInput
from toolq.protocol import ChunkEntry, chunk_from_message
from toolq.workers.batch import Chunk, ChunkRunner
from toolq.workers.call.attempt import Retry
from toolq.workers.results import Countdown


class FakeSlots:
    """``free`` slots besides the chunk's own; counts how many were held at once."""

    def __init__(self, free: int, contended: bool = False) -> None:
        self.free = free
        self.contended = contended
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    @contextmanager
    def holding(self, *, wait: bool) -> Iterator[bool]:
        with self._lock:
            if not wait and self.free <= 0:
                granted = False
            else:
                granted = True
                if not wait:
                    self.free -= 1
                self.held += 1
                self.peak = max(self.peak, self.held)
        try:
            yield granted
        finally:
            if granted:
                with self._lock:
                    self.held -= 1
                    if not wait:
                        self.free += 1


class FakeResults:
    def __init__(self, settled: set[str] | None = None) -> None:
        self.stored: dict[str, dict[str, Any]] = {}
        self.handed: list[str] = []
        self._settled = settled or set()

    def store(self, call_id: str, envelope: dict[str, Any], written: Countdown) -> None:
        assert call_id not in self.stored, f"{call_id} stored twice"
        self.stored[call_id] = envelope

    def handed_off(self, chunk_id: str, call_ids: list[str]) -> None:
        self.handed += call_ids

    def settled(self, chunk_id: str, call_ids: list[str]) -> set[str]:
        return {call_id for call_id in call_ids if call_id in self._settled}


def entries(n: int, tool_id: str = "echo") -> list[ChunkEntry]:
    message = {"tool_id": tool_id, "input": {}, "env": {}, "enqueued_at": time.time()}
    return [ChunkEntry(f"call-{i}", dict(message)) for i in range(n)]


def runner(
    outcomes: Any = (),
    *,
    free: int = 0,
    budget_s: float = 3600.0,
    results: FakeResults | None = None,
    slots: FakeSlots | None = None,
    settings: dict[str, Any] | None = None,
    clock: Any = time.monotonic,
) -> tuple[ChunkRunner, FakeResults, list[tuple[str, Retry]], FakeSlots]:
    handler = rig(outcomes, settings=settings).handler
    retried: list[tuple[str, Retry]] = []
    results = results or FakeResults()
    slots = slots or FakeSlots(free)
    chunk_runner = ChunkRunner(
        handler=handler,
        slots=slots,
        results=results,
        retry=lambda call_id, decision, queue: retried.append((call_id, decision)),
        executor=ThreadPoolExecutor(4),
        extra_slots=free,
        budget_s=budget_s,
        clock=clock,
    )
    return chunk_runner, results, retried, slots


def chunk(items: list[ChunkEntry], redelivered: bool = False) -> Chunk:
    return Chunk("chunk-1", "w", "q", redelivered, items)


def test_every_call_of_a_chunk_ends_under_its_own_id() -> None:
    run, results, retried, _ = runner([ok({"n": 1})])
    report = run.run(chunk(entries(25)))
    assert report.left == [] and retried == []
    assert report.summary() == "25 calls: 25 succeeded, 0 failed"
    assert sorted(results.stored) == sorted(f"call-{i}" for i in range(25))
    assert all(e["id"] == call_id for call_id, e in results.stored.items())
    assert all(e["metadata"]["tool_exec_id"] == call_id for call_id, e in results.stored.items())


def test_a_call_to_retry_is_handed_on_not_stored() -> None:
    settings = {"retryable_errors": ["Error"], "max_attempts": 3}
    run, results, retried, _ = runner([error("tool_error"), ok()], settings=settings)
    report = run.run(chunk(entries(2)))
    assert report.summary() == "2 calls: 1 succeeded, 0 failed, 1 retried"
    assert [call_id for call_id, _ in retried] == ["call-0"]
    assert retried[0][1].request.attempt == 2
    assert list(results.stored) == ["call-1"]  # the retried call is not over yet
    assert results.handed == ["call-0"]


def test_a_chunk_starts_no_call_it_could_not_finish_before_redelivery() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0  # each look at the clock: a second later
        return now[0]

    # hard limit 35 s (timeout 30 s + 5 s): a budget of 40 s leaves room for one more
    run, results, _, _ = runner(budget_s=40.0, clock=clock)
    left = run.run(chunk(entries(6))).left
    assert 1 <= len(results.stored) < 6
    assert [e.call_id for e in left] == [f"call-{i}" for i in range(len(results.stored), 6)]


def test_the_first_call_always_runs_so_a_chunk_always_progresses() -> None:
    run, results, _, _ = runner(budget_s=0.0)
    report = run.run(chunk(entries(3)))
    assert list(results.stored) == ["call-0"] and len(report.left) == 2
    assert report.summary() == "3 calls: 1 succeeded, 0 failed, 2 put back"


def test_a_redelivered_chunk_skips_calls_that_ended_or_were_handed_on() -> None:
    run, results, _, _ = runner(results=FakeResults(settled={"call-0", "call-2"}))
    report = run.run(chunk(entries(4), redelivered=True))
    assert sorted(results.stored) == ["call-1", "call-3"]
    assert report.skipped == 2


def test_a_chunk_spreads_over_free_slots_only() -> None:
    def slow(call: Any) -> Any:
        time.sleep(0.02)
        return ok()

    run, results, _, slots = runner(slow, free=2)
    run.run(chunk(entries(12)))
    assert len(results.stored) == 12
    assert slots.peak == 3  # its own slot and the two free ones, never more

    run, results, _, slots = runner(slow, free=0)
    run.run(chunk(entries(4)))
    assert len(results.stored) == 4 and slots.peak == 1


def test_extra_slots_are_given_back_when_a_single_call_waits() -> None:
    threads: list[str] = []

    def slow(call: Any) -> Any:
        threads.append(threading.current_thread().name)
        time.sleep(0.01)
        return ok()

    slots = FakeSlots(3, contended=True)
    run, results, _, _ = runner(slow, slots=slots, free=3)
    run.run(chunk(entries(20)))
    assert len(results.stored) == 20  # the chunk's own slot finished the rest
    helpers = [name for name in threads if name != threading.current_thread().name]
    assert len(helpers) <= 3  # each helper ran one call, then gave its slot back


def test_a_handler_error_still_ends_the_call() -> None:
    run, results, _, _ = runner()

    def broken(message: Any, delivery: Any) -> Any:
        raise RuntimeError("bug")

    run.handler.handle = broken  # type: ignore[method-assign]
    assert run.run(chunk(entries(2))).failed == 2
    assert {e["error"]["kind"] for e in results.stored.values()} == {"crashed"}


@pytest.mark.parametrize(
    "value",
    [
        [],
        {"id": "x"},
        [{"call": {}}],
        [{"id": "", "call": {}}],
        [{"id": "a" * 201, "call": {}}],
        [{"id": "a", "call": {}}, {"id": "a", "call": {}}],
        [{"id": 5, "call": {}}],
    ],
)
def test_what_is_not_a_chunk_is_refused(value: Any) -> None:
    with pytest.raises(InvalidInput):
        chunk_from_message(value)
