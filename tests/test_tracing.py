"""OpenTelemetry tracing across a real producer, Redis, a real worker process and Bun.

The producer (this process) exports to the SDK's in-memory exporter; the worker, another
process, appends its spans as JSON lines to ``OTEL_TRACES_FILE`` (the SDK's console
exporter pointed at a file), which the test reads back. Links are checked by trace and
span ids, which is what a collector would join them by.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
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
    monkeypatch.setattr(tracing, "_tracer", None)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")  # on; the provider above is used
    _exporter.clear()
    yield _exporter
    _exporter.clear()


def _worker_spans(path: Path, name: str, count: int) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [s for s in lines if s["name"] == name]

    assert wait_until(lambda: len(found()) >= count, timeout_s=30), path.read_text()
    return found()


def _worker_env(trace_file: Path) -> dict[str, str]:
    # The worker exports to a file only (not the console: OTEL_TRACES_EXPORTER cleared).
    return {"OTEL_TRACES_FILE": str(trace_file), "OTEL_TRACES_EXPORTER": ""}


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
