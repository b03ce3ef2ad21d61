"""OpenTelemetry tracing, optional (``pip install 'toolq[otel]'``).

Tracing is on only when OpenTelemetry is configured through its standard environment
(``OTEL_TRACES_EXPORTER`` other than ``none``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), or when ``OTEL_TRACES_FILE`` (toolq's own, not a
standard variable: ``TOOLQ_*`` names are configuration keys) names a file that spans are
appended to as JSON lines, one span a line (tests and local debugging). When it
is off, :func:`enabled` is false, nothing of OpenTelemetry is imported and every hook
below is a no-op: callers check :func:`enabled` before doing anything else.

The trace context travels in the Celery message headers (W3C ``traceparent``/
``tracestate``). Those headers are deliberately outside the call's signature
(:mod:`toolq.signing` signs the task, id, queue and message, not free headers): a
tampered ``traceparent`` can only mislabel a trace, never change what runs.

If the process already has a tracer provider (an app that configured the SDK itself,
or a test's in-memory exporter), toolq uses it; otherwise it sets one up from the
environment on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

TRACE_HEADERS = ("traceparent", "tracestate")
_lock = threading.Lock()
_tracer: Any = None


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when OpenTelemetry is configured for this process (see the module)."""
    env = os.environ if environ is None else environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        exporter
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_TRACES_FILE")
    )


def _setup() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):  # configured by the app
        return trace.get_tracer("toolq")
    # The SDK reads OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and OTEL_TRACES_SAMPLER(_ARG).
    named = os.environ.get("OTEL_SERVICE_NAME")
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": "toolq"}))
    path = os.environ.get("OTEL_TRACES_FILE")
    if path:
        out = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        provider.add_span_processor(  # batched: written off the call's thread
            BatchSpanProcessor(
                ConsoleSpanExporter(out=out, formatter=lambda s: s.to_json(indent=None) + "\n")
            )
        )
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return trace.get_tracer("toolq")


def tracer() -> Any:
    """The ``toolq`` tracer (set up on first use)."""
    global _tracer
    if _tracer is None:
        with _lock:
            if _tracer is None:
                _tracer = _setup()
    return _tracer


def _messaging(queue: str | None, message_id: str, tool_id: str | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": "redis",
        "messaging.message.id": message_id,
    }
    if queue:
        attributes["messaging.destination.name"] = queue
    if tool_id:
        attributes["toolq.tool_id"] = tool_id
    return attributes


@contextmanager
def producer_span(
    name: str,
    headers: MutableMapping[str, Any],
    *,
    queue: str | None,
    message_id: str,
    tool_id: str | None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """A PRODUCER span around one send; its context is injected into ``headers``."""
    from opentelemetry import propagate, trace

    with tracer().start_as_current_span(
        name,
        kind=trace.SpanKind.PRODUCER,
        attributes={**_messaging(queue, message_id, tool_id), **(attributes or {})},
    ) as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        headers.update({k: v for k, v in carrier.items() if k in TRACE_HEADERS})
        yield span


def headers_of(request: Any) -> dict[str, str]:
    """The trace headers of a Celery task request (custom headers land on the request
    itself, or under ``headers`` depending on Celery's message protocol path)."""
    found: dict[str, str] = {}
    nested = getattr(request, "headers", None)
    for key in TRACE_HEADERS:
        value = getattr(request, key, None)
        if value is None and isinstance(nested, Mapping):
            value = nested.get(key)
        if isinstance(value, str):
            found[key] = value
    return found


@contextmanager
def consumer_span(
    name: str,
    carrier: Mapping[str, str],
    *,
    queue: str | None,
    message_id: str,
    tool_id: str | None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """A CONSUMER span for one delivery, a child of the context in ``carrier``."""
    from opentelemetry import propagate, trace

    parent = propagate.extract(dict(carrier))
    with tracer().start_as_current_span(
        name,
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={**_messaging(queue, message_id, tool_id), **(attributes or {})},
    ) as span:
        yield span


def inject_current(headers: MutableMapping[str, Any]) -> None:
    """Put the current span's context into ``headers`` (a retry's next message)."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    headers.update({k: v for k, v in carrier.items() if k in TRACE_HEADERS})


MAX_OUTPUT_EVENTS = 20
"""A run span's events: at most this many of the tool's last stderr lines..."""
MAX_OUTPUT_LINE = 512
"""...each cut to this many characters."""


@contextmanager
def run_span(tool_id: str) -> Iterator[Any]:
    """A ``toolq.run`` span around the runtime's run of one attempt (the current span's
    child); ``None`` and nothing else when tracing is off."""
    if not enabled():
        yield None
        return
    from opentelemetry import trace

    if not trace.get_current_span().get_span_context().is_valid:
        yield None  # a chunk's call, on a slot thread: no attempt span to hang it under
        return
    with tracer().start_as_current_span("toolq.run", attributes={"toolq.tool_id": tool_id}) as span:
        yield span


def record_output(span: Any, stderr: str) -> None:
    """The tool's last stderr lines (``console.log`` and the like), already redacted by
    the caller, as ``tool.output`` events on ``span``: bounded in count and size."""
    if span is None or not stderr:
        return
    lines = [line for line in stderr.splitlines() if line.strip()]
    if len(lines) > MAX_OUTPUT_EVENTS:
        span.set_attribute("toolq.output.lines_dropped", len(lines) - MAX_OUTPUT_EVENTS)
    for line in lines[-MAX_OUTPUT_EVENTS:]:
        span.add_event("tool.output", {"line": line[:MAX_OUTPUT_LINE]})
