"""Tracing's parts that need no worker: the hooks' spans (an in-memory exporter), the
collector example in docker-compose (the `otel` profile) and the benchmark's report."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from toolq import tracing

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, InMemorySpanExporter]]:
    """Tracing on, through a provider of the test's own (not the process's global one)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracing.reset()
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("toolq"))
    yield provider.get_tracer("test"), exporter
    monkeypatch.undo()
    tracing.reset()


def test_hooks_do_nothing_when_tracing_is_not_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    tracing.reset()
    try:
        assert not tracing.enabled()
        with tracing.step("toolq.cache") as span, tracing.run_span("echo", "warm") as run:
            assert span is None and run is None
        assert tracing.current_context() is None
        with tracing.attempt_span(
            None, queue="q", message_id="m", tool_id="t", attempt=1, chunk_id="c"
        ) as attempt:
            assert attempt is None
        monkeypatch.setenv("OTEL_TRACES_FILE", "/dev/null")
        assert not tracing.enabled()  # read once, as the SDK reads its configuration
    finally:
        tracing.reset()


def test_steps_are_children_of_the_current_span_and_never_roots(
    exported: tuple[Any, InMemorySpanExporter],
) -> None:
    test_tracer, exporter = exported
    with tracing.step("toolq.cache") as orphan:
        assert orphan is None  # no attempt to hang it under: no span at all
    with test_tracer.start_as_current_span("toolq.attempt") as attempt:
        with tracing.step("toolq.breaker", {"toolq.breaker.state": "closed"}) as step:
            assert step is not None
        with tracing.run_span("echo", "spawn") as run:
            now = time.time_ns()
            tracing.record_spawn(run, (now - 5_000_000, now - 1_000_000))
            tracing.record_spawn(run, None)  # warm, or started ahead: nothing
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"toolq.attempt", "toolq.breaker", "toolq.run", "toolq.spawn"}
    attempt_id = attempt.get_span_context().span_id
    assert spans["toolq.breaker"].parent.span_id == attempt_id  # type: ignore[union-attr]
    assert spans["toolq.run"].parent.span_id == attempt_id  # type: ignore[union-attr]
    assert spans["toolq.run"].attributes == {"toolq.tool_id": "echo", "toolq.mode": "spawn"}
    spawn = spans["toolq.spawn"]
    assert spawn.parent.span_id == run.get_span_context().span_id  # type: ignore[union-attr]
    assert (spawn.end_time or 0) - (spawn.start_time or 0) == 4_000_000  # the times given


def test_queue_wait_runs_from_publication_to_pick_up(
    exported: tuple[Any, InMemorySpanExporter],
) -> None:
    test_tracer, exporter = exported
    headers: dict[str, Any] = {}
    with test_tracer.start_as_current_span("toolq.enqueue"):
        tracing.inject_current(headers)
    assert set(headers) == {"traceparent", tracing.PUBLISHED_HEADER}
    published = float(headers[tracing.PUBLISHED_HEADER])
    time.sleep(0.02)
    with tracing.consumer_span(
        "toolq.attempt", headers, queue="q", message_id="m", tool_id="echo"
    ) as attempt:
        tracing.queue_wait(attempt, headers)
    without: dict[str, str] = {}  # a producer without tracing: the call's enqueued_at
    with tracing.consumer_span(
        "toolq.chunk", without, queue="q", message_id="c", tool_id=None
    ) as chunk:
        tracing.queue_wait(chunk, without, enqueued_at=published)
        tracing.queue_wait(chunk, without, enqueued_at=None)  # neither: no span
    waits = [s for s in exporter.get_finished_spans() if s.name == "toolq.queue_wait"]
    assert len(waits) == 2
    for wait, parent in zip(waits, (attempt, chunk), strict=True):
        assert wait.parent.span_id == parent.get_span_context().span_id  # type: ignore[union-attr]
        assert wait.start_time == int(published * 1e9)
        assert wait.end_time == parent.start_time  # type: ignore[attr-defined]
        assert (wait.end_time or 0) - (wait.start_time or 0) >= 20_000_000


def test_outcome_attributes(exported: tuple[Any, InMemorySpanExporter]) -> None:
    test_tracer, exporter = exported
    with test_tracer.start_as_current_span("a") as span:
        tracing.set_outcome(span, "failed", "timeout")
    with test_tracer.start_as_current_span("b"):
        tracing.set_current_outcome("wait")
    a, b = exporter.get_finished_spans()
    assert a.attributes == {"toolq.outcome": "failed", "toolq.error.kind": "timeout"}
    assert b.attributes == {"toolq.outcome": "wait"}


# -- the collector example -----------------------------------------------------------------


def _interpolate(value: str, env: dict[str, str]) -> str:
    """docker compose's ``${NAME:-default}``, the only form the tracing settings use."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


def test_compose_otel_profile_sends_every_span_to_jaeger_through_a_collector() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["otel-collector"]["profiles"] == ["otel"]
    assert services["jaeger"]["profiles"] == ["otel"]
    # only under the profile: a plain `docker compose up` starts neither
    others = {name for name, s in services.items() if "profiles" in s}
    assert others == {"otel-collector", "jaeger"}
    # the collector's configuration is the file in deploy/, read where the image reads it
    (mount,) = services["otel-collector"]["volumes"]
    source, target, _ = mount.split(":")
    assert services["otel-collector"]["command"] == [f"--config={target}"]
    config = yaml.safe_load((ROOT / source).read_text())
    (pipeline,) = config["service"]["pipelines"].values()
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(config[kind]), kind
    (exporter,) = (config["exporters"][name] for name in pipeline["exporters"])
    host, port = exporter["endpoint"].split(":")
    assert host in services and port == "4317"  # Jaeger's OTLP/gRPC port
    assert services[host]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(":4318")
    # workers and the producer: off unless the endpoint is given, then on, to the collector
    endpoint = "http://otel-collector:4318"
    header = (ROOT / "docker-compose.yml").read_text()
    assert f"OTEL_EXPORTER_OTLP_ENDPOINT={endpoint} docker compose --profile otel up" in header
    for name in ("worker", "producer"):
        env = services[name]["environment"]
        assert env["OTEL_SERVICE_NAME"] == f"toolq-{name}"
        unset = {k: _interpolate(str(v), {}) for k, v in env.items()}
        given = {
            k: _interpolate(str(v), {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
            for k, v in env.items()
        }
        assert not tracing.enabled(unset), name
        assert tracing.enabled(given) and given["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint
    # the image has the SDK and the OTLP exporter (the otel extra)
    assert "pip install --no-cache-dir '.[otel]'" in (ROOT / "Dockerfile").read_text()


# -- the benchmark's report ----------------------------------------------------------------


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "tracing_cost", ROOT / "bench" / "tracing_cost.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_bench_section_replaces_its_earlier_self_in_the_report(tmp_path: Path) -> None:
    bench = _bench()
    report = tmp_path / "RESULTS.md"
    report.write_text("# toolq benchmarks\n\n## Trivial call\n\nrows\n")
    bench.write_section(report, bench.SECTION + "\n\nfirst\n")
    bench.write_section(report, bench.SECTION + "\n\nsecond\n")
    text = report.read_text()
    assert text.count(bench.SECTION) == 1 and "first" not in text and "second" in text
    assert text.startswith("# toolq benchmarks\n\n## Trivial call\n\nrows\n\n")
    report.write_text(text + "\n## Later\n\nkept\n")
    bench.write_section(report, bench.SECTION + "\n\nthird\n")
    assert "kept" in report.read_text() and "second" not in report.read_text()


def test_bench_hooks_cost_when_not_configured_is_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_FILE"):
        monkeypatch.delenv(name, raising=False)
    try:
        assert _bench().hooks_off_us(loops=20_000) < 50  # µs per call; ~1 here
    finally:
        tracing.reset()


def test_an_unexpected_error_leaves_its_type_only(
    exported: tuple[Any, InMemorySpanExporter],
) -> None:
    _, exporter = exported

    class Expected(Exception):
        pass

    for error in (Expected("an outcome"), RuntimeError("input: s3cr3t")):
        with (
            pytest.raises(type(error)),
            tracing.consumer_span(
                "toolq.attempt", {}, queue="q", message_id="m", tool_id="t", expected=(Expected,)
            ),
        ):
            raise error
    expected, unexpected = exporter.get_finished_spans()
    assert expected.status.is_unset and not expected.events
    assert not unexpected.status.is_ok and unexpected.status.description == "RuntimeError"
    assert [dict(e.attributes or {}) for e in unexpected.events] == [
        {"exception.type": "RuntimeError"}
    ]


def test_a_span_line_is_the_sdks_json_without_the_resource(
    exported: tuple[Any, InMemorySpanExporter],
) -> None:
    test_tracer, exporter = exported
    with test_tracer.start_as_current_span("toolq.attempt"), tracing.run_span("echo") as run:
        tracing.record_output(run, "[LOG] hello")
    for span in exporter.get_finished_spans():
        ours, sdks = json.loads(tracing.span_line(span)), json.loads(span.to_json())
        assert ours.pop("service") == sdks["resource"]["attributes"]["service.name"]
        for key in ("resource", "links"):
            del sdks[key]
        del sdks["context"]["trace_state"]
        assert ours == sdks
