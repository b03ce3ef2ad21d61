"""OpenTelemetry tracing across a real producer, Redis, a real worker process and Bun.

The producer (this process) exports to the SDK's in-memory exporter; the worker, another
process, appends its spans as JSON lines to ``OTEL_TRACES_FILE`` (the SDK's console
exporter pointed at a file), which the test reads back. Links are checked by trace and
span ids, which is what a collector would join them by.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from tests.conftest import TOOLS_CONFIG, StartWorker, wait_until
from toolq import tracing
from toolq.config.loader import load_settings
from toolq.producers.client import ToolClient

_exporter = InMemorySpanExporter()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")  # on; the provider above is used
    tracing.reset()
    _exporter.clear()
    yield _exporter
    _exporter.clear()
    monkeypatch.undo()
    tracing.reset()


def _worker_spans(path: Path, name: str, count: int) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [s for s in lines if s["name"] == name]

    assert wait_until(lambda: len(found()) >= count, timeout_s=30), path.read_text()
    return found()


def _worker_env(trace_file: Path) -> dict[str, str]:
    # The worker exports to a file only (not the console: OTEL_TRACES_EXPORTER cleared),
    # in batches written every 200 ms (the SDK's default: 5 s).
    return {
        "OTEL_TRACES_FILE": str(trace_file),
        "OTEL_TRACES_EXPORTER": "",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


def _hex(value: int, width: int) -> str:
    return "0x" + format(value, f"0{width}x")


def test_retries_stay_in_the_enqueues_trace(
    client: ToolClient, start_worker: StartWorker, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    trace_file = tmp_path / "worker-spans.jsonl"
    queue = f"q-trace-{uuid.uuid4().hex[:8]}"
    start_worker(queues=[queue], env=_worker_env(trace_file))
    result = client.run(
        "flaky", {"counter": str(tmp_path / "runs"), "succeed_on": 2}, queue=queue, wait=60
    )
    assert result.ok, result

    (enqueue,) = [s for s in spans.get_finished_spans() if s.name == "toolq.enqueue"]
    assert enqueue.kind == trace.SpanKind.PRODUCER
    assert enqueue.attributes is not None
    assert enqueue.attributes["messaging.system"] == "redis"
    assert enqueue.attributes["messaging.destination.name"] == queue
    assert enqueue.attributes["messaging.message.id"] == result.id
    assert enqueue.attributes["toolq.tool_id"] == "flaky"

    attempts = sorted(
        _worker_spans(trace_file, "toolq.attempt", 2),
        key=lambda s: s["attributes"]["toolq.attempt"],
    )
    first, second = attempts
    trace_id = _hex(enqueue.context.trace_id, 32)
    assert {s["context"]["trace_id"] for s in attempts} == {trace_id}
    assert first["parent_id"] == _hex(enqueue.context.span_id, 16)
    assert second["parent_id"] == first["context"]["span_id"]  # the retry: a child of try 1
    assert first["kind"] == second["kind"] == "SpanKind.CONSUMER"
    assert first["attributes"]["toolq.outcome"] == "retry"
    assert second["attributes"]["toolq.outcome"] == "succeeded"
    assert second["attributes"]["messaging.message.id"] == result.id
    assert second["attributes"]["toolq.tool_id"] == "flaky"


def test_a_chunk_is_one_trace(
    client: ToolClient, start_worker: StartWorker, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    trace_file = tmp_path / "worker-spans.jsonl"
    queue = f"q-trace-{uuid.uuid4().hex[:8]}"
    start_worker(queues=[queue], env=_worker_env(trace_file))
    results = client.map("echo", [{"n": n} for n in range(3)], queue=queue, chunk_size=3, wait=30)
    assert all(r.ok for r in results)

    (enqueue,) = [s for s in spans.get_finished_spans() if s.name == "toolq.enqueue_chunk"]
    assert enqueue.attributes is not None
    assert enqueue.attributes["messaging.batch.message_count"] == 3
    (chunk,) = _worker_spans(trace_file, "toolq.chunk", 1)
    assert chunk["context"]["trace_id"] == _hex(enqueue.context.trace_id, 32)
    assert chunk["parent_id"] == _hex(enqueue.context.span_id, 16)
    assert chunk["attributes"]["messaging.message.id"] == enqueue.attributes["messaging.message.id"]


def test_off_when_opentelemetry_is_not_configured() -> None:
    assert not tracing.enabled({})
    assert not tracing.enabled({"OTEL_TRACES_EXPORTER": "none", "OTEL_TRACES_FILE": "/x"})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})


def test_trace_headers_do_not_break_signed_calls(
    redis_url: str, start_worker: StartWorker, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    # traceparent rides outside the signature (toolq/tracing.py): a signed call, and its
    # re-signed retry, still pass the worker's check, in one trace.
    key = Fernet.generate_key().decode()
    trace_file = tmp_path / "worker-spans.jsonl"
    queue = f"q-trace-{uuid.uuid4().hex[:8]}"
    start_worker(queues=[queue], env={**_worker_env(trace_file), "TOOLQ_SECRET_KEY": key})
    settings = load_settings(
        TOOLS_CONFIG, environ={"TOOLQ_SECRET_KEY": key}, overrides={"redis_url": redis_url}
    )
    with ToolClient(settings) as signed:
        result = signed.run(
            "flaky", {"counter": str(tmp_path / "runs"), "succeed_on": 2}, queue=queue, wait=60
        )
    assert result.ok, result
    attempts = _worker_spans(trace_file, "toolq.attempt", 2)
    assert len({s["context"]["trace_id"] for s in attempts}) == 1


def test_a_failed_call_names_its_error_kind(
    client: ToolClient, start_worker: StartWorker, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    trace_file = tmp_path / "worker-spans.jsonl"
    queue = f"q-trace-{uuid.uuid4().hex[:8]}"
    start_worker(queues=[queue], env=_worker_env(trace_file))
    result = client.run("non_retryable", {"counter": str(tmp_path / "runs")}, queue=queue, wait=60)
    assert not result.ok
    (attempt,) = _worker_spans(trace_file, "toolq.attempt", 1)
    assert attempt["attributes"]["toolq.outcome"] == "failed"
    assert attempt["attributes"]["toolq.error.kind"] == result.error.kind
    assert attempt["status"]["status_code"] == "ERROR"


def test_the_tools_output_lines_are_events_of_its_run_redacted(
    client: ToolClient, start_worker: StartWorker, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    trace_file = tmp_path / "worker-spans.jsonl"
    queue = f"q-trace-{uuid.uuid4().hex[:8]}"
    start_worker(queues=[queue], env=_worker_env(trace_file))
    result = client.run("print_env", {}, env={"API_KEY": secret}, queue=queue, wait=60)
    assert result.ok, result
    (run,) = _worker_spans(trace_file, "toolq.run", 1)
    (attempt,) = _worker_spans(trace_file, "toolq.attempt", 1)
    assert run["parent_id"] == attempt["context"]["span_id"]
    lines = [e["attributes"]["line"] for e in run["events"] if e["name"] == "tool.output"]
    assert "[LOG] using ***" in lines, run["events"]  # redacted, as the worker log has it
    assert secret not in trace_file.read_text()


def test_output_events_are_bounded_in_count_and_size() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("run") as span:
        tracing.record_output(span, "\n".join(f"{n:03d}" + "x" * 2000 for n in range(50)))
    (finished,) = exporter.get_finished_spans()
    lines = [e.attributes["line"] for e in finished.events if e.attributes]
    assert len(lines) == tracing.MAX_OUTPUT_EVENTS  # the last ones
    assert lines[0].startswith("030") and lines[-1].startswith("049")
    assert all(len(line) == tracing.MAX_OUTPUT_LINE for line in lines)
    assert finished.attributes is not None
    assert finished.attributes["toolq.output.lines_dropped"] == 30


# -- the steps of an attempt ---------------------------------------------------------------

TRACING_CONFIG = Path(__file__).parent / "tools" / "tracing.yaml"
STEPS = {"toolq.queue_wait", "toolq.cache", "toolq.flow", "toolq.breaker", "toolq.run"}


def _ns(stamp: str) -> int:
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 10**9 + moment.microsecond * 1000


def _children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for span in spans:
        if span["parent_id"] == parent["context"]["span_id"]:
            assert span["name"] not in found, (span["name"], parent["name"])
            found[span["name"]] = span
    return found


def _all_spans(path: Path, trace_id: str, until: Callable[[list[dict[str, Any]]], bool]) -> Any:
    def found() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [s for s in lines if s["context"]["trace_id"] == trace_id]

    assert wait_until(lambda: until(found()), timeout_s=30), path.read_text()
    return found()


def _named(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name]


def test_each_attempts_steps_are_its_children_across_a_retry(
    client: ToolClient, start_worker: StartWorker, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    trace_file = tmp_path / "worker-spans.jsonl"
    queue = f"q-trace-{uuid.uuid4().hex[:8]}"
    start_worker(config=TRACING_CONFIG, queues=[queue], env=_worker_env(trace_file))
    call = {"counter": str(tmp_path / "runs"), "succeed_on": 2}
    result = client.run("flaky", call, queue=queue, wait=60)
    assert result.ok, result

    (enqueue,) = [s for s in spans.get_finished_spans() if s.name == "toolq.enqueue"]
    worker = _all_spans(
        trace_file,
        _hex(enqueue.context.trace_id, 32),
        lambda found: len(_named(found, "toolq.attempt")) == 2 and len(found) >= 14,
    )
    first, second = sorted(_named(worker, "toolq.attempt"), key=lambda s: s["start_time"])
    assert first["parent_id"] == _hex(enqueue.context.span_id, 16)
    assert second["parent_id"] == first["context"]["span_id"]
    assert (first["attributes"]["toolq.outcome"], second["attributes"]["toolq.outcome"]) == (
        "retry",
        "succeeded",
    )
    assert first["status"]["status_code"] == "UNSET" and not first["events"]  # not an error
    for attempt in (first, second):
        steps = _children(worker, attempt)
        assert set(steps) >= STEPS, (attempt["attributes"], sorted(steps))
        run = steps["toolq.run"]
        assert run["attributes"]["toolq.mode"] == "spawn"
        (spawn,) = _children(worker, run).values()  # a fresh Bun for each attempt
        assert spawn["name"] == "toolq.spawn"
        assert _ns(run["start_time"]) <= _ns(spawn["start_time"]) < _ns(spawn["end_time"])
        assert _ns(spawn["end_time"]) <= _ns(run["end_time"])
        # the steps in the order they run, each within its attempt
        order = ["toolq.cache", "toolq.flow", "toolq.breaker", "toolq.run"]
        starts = [_ns(steps[name]["start_time"]) for name in order]
        assert starts == sorted(starts), order
        assert _ns(attempt["start_time"]) <= starts[0]
        assert _ns(steps["toolq.run"]["end_time"]) <= _ns(attempt["end_time"])
        assert steps["toolq.cache"]["attributes"]["toolq.cache.hit"] is False
        assert steps["toolq.flow"]["attributes"]["toolq.flow.granted"] is True
        assert steps["toolq.breaker"]["attributes"]["toolq.breaker.state"] == "closed"
        # queue wait: from the message's publication to the attempt's pick-up
        wait = steps["toolq.queue_wait"]
        assert wait["end_time"] == attempt["start_time"]
    first_wait = _children(worker, first)["toolq.queue_wait"]
    assert _ns(first_wait["start_time"]) >= enqueue.start_time - 10**6  # (µs in the JSON)
    assert enqueue.end_time is not None
    assert _ns(first_wait["start_time"]) <= enqueue.end_time
    # the retry's wait holds its countdown (100 ms, no jitter)
    second_wait = _children(worker, second)["toolq.queue_wait"]
    assert _ns(second_wait["end_time"]) - _ns(second_wait["start_time"]) >= 100 * 10**6
    assert _ns(second_wait["start_time"]) >= _ns(_children(worker, first)["toolq.run"]["end_time"])

    # The same call again: answered from the cache, nothing runs.
    spans.clear()
    again = client.run("flaky", call, queue=queue, wait=60)
    assert again.ok and again.metadata.get("cached"), again
    (enqueue,) = [s for s in spans.get_finished_spans() if s.name == "toolq.enqueue"]
    worker = _all_spans(
        trace_file, _hex(enqueue.context.trace_id, 32), lambda found: len(found) >= 3
    )
    (attempt,) = _named(worker, "toolq.attempt")
    steps = _children(worker, attempt)
    assert set(steps) == {"toolq.queue_wait", "toolq.cache"}
    assert steps["toolq.cache"]["attributes"]["toolq.cache.hit"] is True


def test_a_chunks_calls_are_its_children_and_a_retry_stays_in_its_trace(
    client: ToolClient, start_worker: StartWorker, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    trace_file = tmp_path / "worker-spans.jsonl"
    queue = f"q-trace-{uuid.uuid4().hex[:8]}"
    start_worker(config=TRACING_CONFIG, queues=[queue], env=_worker_env(trace_file))
    calls = [
        {"counter": str(tmp_path / f"runs-{n}"), "succeed_on": 2 if n == 1 else 1} for n in range(3)
    ]
    results = client.map("flaky", calls, queue=queue, chunk_size=3, wait=60)
    assert all(r.ok for r in results), results

    (enqueue,) = [s for s in spans.get_finished_spans() if s.name == "toolq.enqueue_chunk"]
    worker = _all_spans(
        trace_file,
        _hex(enqueue.context.trace_id, 32),
        lambda found: len(_named(found, "toolq.attempt")) == 4 and len(found) >= 28,
    )
    (chunk,) = _named(worker, "toolq.chunk")
    assert chunk["parent_id"] == _hex(enqueue.context.span_id, 16)
    below = _named(worker, "toolq.attempt")
    chunk_id = chunk["context"]["span_id"]
    in_chunk = [s for s in below if s["parent_id"] == chunk_id]
    assert sorted(s["attributes"]["messaging.message.id"] for s in in_chunk) == sorted(
        r.id for r in results
    )
    assert {s["attributes"]["toolq.chunk.id"] for s in in_chunk} == {
        chunk["attributes"]["messaging.message.id"]
    }
    (chunk_wait,) = [s for s in _named(worker, "toolq.queue_wait") if s["parent_id"] == chunk_id]
    assert chunk_wait["end_time"] == chunk["start_time"]
    for attempt in in_chunk:
        steps = _children(worker, attempt)
        assert STEPS - {"toolq.queue_wait"} <= set(steps), sorted(steps)
        assert set(_children(worker, steps["toolq.run"])) == {"toolq.spawn"}
    (retried,) = [s for s in in_chunk if s["attributes"]["toolq.outcome"] == "retry"]
    assert retried["attributes"]["messaging.message.id"] == results[1].id
    # the retry is a message of its own, published under the chunk's call, in this trace
    (republished,) = _named(worker, "toolq.enqueue")
    assert republished["kind"] == "SpanKind.PRODUCER"
    assert republished["parent_id"] == retried["context"]["span_id"]
    (last,) = [s for s in below if s not in in_chunk]
    assert last["parent_id"] == republished["context"]["span_id"]
    assert last["attributes"]["toolq.attempt"] == 2
    assert last["attributes"]["toolq.outcome"] == "succeeded"
    assert set(_children(worker, last)) >= STEPS


def test_a_wait_for_a_rate_token_is_the_same_attempt_later(
    client: ToolClient, start_worker: StartWorker, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    trace_file = tmp_path / "worker-spans.jsonl"
    queue = f"q-trace-{uuid.uuid4().hex[:8]}"
    start_worker(config=TRACING_CONFIG, queues=[queue], env=_worker_env(trace_file))
    log_file = tmp_path / "stamps"
    calls = [client.enqueue("rated", {"log": str(log_file)}, queue=queue) for _ in range(3)]
    assert all(call.result(timeout=60).ok for call in calls)

    enqueues = [s for s in spans.get_finished_spans() if s.name == "toolq.enqueue"]
    waited = []
    for enqueue in enqueues:
        worker = _all_spans(
            trace_file,
            _hex(enqueue.context.trace_id, 32),
            lambda found: any(
                s["attributes"].get("toolq.outcome") == "succeeded"
                for s in _named(found, "toolq.attempt")
            ),
        )
        attempts = sorted(_named(worker, "toolq.attempt"), key=lambda s: s["start_time"])
        assert all(a["attributes"]["toolq.attempt"] == 1 for a in attempts)
        for before, after in itertools.pairwise(attempts):
            assert before["attributes"]["toolq.outcome"] == "wait"
            assert after["parent_id"] == before["context"]["span_id"]
            assert "toolq.run" not in _children(worker, before)
            assert (
                _children(worker, before)["toolq.flow"]["attributes"]["toolq.flow.granted"] is False
            )
            waited.append(after)
    assert waited  # 3 calls at 4/s: at least one waited for its token
