"""OpenTelemetry tracing, optional (``pip install 'toolq[otel]'``).

Tracing is on only when OpenTelemetry is configured through its standard environment
(``OTEL_TRACES_EXPORTER`` other than ``none``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), or when ``OTEL_TRACES_FILE`` (toolq's own, not a
standard variable: ``TOOLQ_*`` names are configuration keys) names a file that spans are
appended to as JSON lines, one span a line (tests and local debugging). When it
is off, :func:`enabled` is false (a cached flag), nothing of OpenTelemetry is imported
and every hook below is a no-op: the send and task wrappers check :func:`enabled`
before building anything, the steps' spans are one shared no-op context manager.

The trace context travels in the Celery message headers (W3C ``traceparent``/
``tracestate``). Those headers are deliberately outside the call's signature
(:mod:`toolq.signing` signs the task, id, queue and message, not free headers): a
tampered ``traceparent`` can only mislabel a trace, never change what runs.

If the process already has a tracer provider (an app that configured the SDK itself,
or a test's in-memory exporter), toolq uses it; otherwise it sets one up from the
environment on first use. Whether tracing is on is read from the environment once, on
first use, as the SDK reads its own configuration (:func:`reset` reads it again).

The spans of one call (each a child of the one above it)::

    toolq.enqueue (PRODUCER, the app)       toolq.enqueue_chunk (PRODUCER, one per chunk)
    └ toolq.attempt (CONSUMER, per attempt)  └ toolq.chunk (CONSUMER)
      ├ toolq.queue_wait                       └ toolq.attempt (one per call of the chunk)
      ├ toolq.cache                              └ (the same children as a single call's)
      ├ toolq.flow
      ├ toolq.breaker
      ├ toolq.run  (tool.output events: the tool's last stderr lines, redacted)
      │ └ toolq.spawn  (a Bun process launched for this call: spawn mode, cold)
      └ toolq.attempt (the retry, or the wait for a slot or rate token: its next message)

A step's span is there only when the step does something for the call's tool (a cache,
flow control or a breaker configured). ``toolq.queue_wait`` and ``toolq.spawn`` are
recorded with the times they happened (publication to pick-up; the launch), not timed
around code.

Over 400 lines on purpose: every use of OpenTelemetry in toolq is here, behind
:func:`enabled`, so that no other module imports it and tracing off costs a flag check.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

TRACE_HEADERS = ("traceparent", "tracestate")
PUBLISHED_HEADER = "toolq_published"
"""When a traced message was published (epoch seconds): its queue wait starts there."""
_lock = threading.Lock()
_tracer: Any = None
_on: bool | None = None


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when OpenTelemetry is configured for this process (see the module); the
    process's environment is read once (``environ``: that one, every time)."""
    global _on
    if environ is None:
        if _on is None:
            _on = _configured(os.environ)
        return _on
    return _configured(environ)


def reset() -> None:
    """Read the environment again (tests, benchmarks): the next use sets tracing up anew
    (a tracer provider already installed in the process stays)."""
    global _on, _tracer
    _on = None
    _tracer = None


def _configured(env: Mapping[str, str]) -> bool:
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

    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):  # configured by the app
        return trace.get_tracer("toolq")
    trace.set_tracer_provider(provider_from_env())
    return trace.get_tracer("toolq")


def provider_from_env() -> Any:
    """A tracer provider with the exporters the environment names (see the module)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    # The SDK reads OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and OTEL_TRACES_SAMPLER(_ARG).
    named = os.environ.get("OTEL_SERVICE_NAME")
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": "toolq"}))
    path = os.environ.get("OTEL_TRACES_FILE")
    if path:
        out = open(path, "a")  # noqa: SIM115 (lives as long as the process; flushed per batch)
        provider.add_span_processor(  # batched: written off the call's thread
            BatchSpanProcessor(ConsoleSpanExporter(out=out, formatter=span_line))
        )
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def span_line(span: Any) -> str:
    """One span as a JSON line for ``OTEL_TRACES_FILE``: the fields of the SDK's
    ``to_json`` but the resource (the same for every span of a process), compact —
    a third of the cost of ``to_json``, which writes the resource out with each span."""
    from opentelemetry.sdk.util import ns_to_iso_str

    context, parent = span.context, span.parent
    status = {"status_code": span.status.status_code.name}
    if span.status.description:
        status["description"] = span.status.description
    line = {
        "name": span.name,
        "context": {
            "trace_id": f"0x{context.trace_id:032x}",
            "span_id": f"0x{context.span_id:016x}",
        },
        "kind": str(span.kind),
        "parent_id": None if parent is None else f"0x{parent.span_id:016x}",
        "start_time": ns_to_iso_str(span.start_time),
        "end_time": ns_to_iso_str(span.end_time),
        "status": status,
        "attributes": dict(span.attributes or {}),
        "events": [
            {
                "name": event.name,
                "timestamp": ns_to_iso_str(event.timestamp),
                "attributes": dict(event.attributes or {}),
            }
            for event in span.events
        ],
        "service": span.resource.attributes.get("service.name"),
    }
    return json.dumps(line, separators=(",", ":"), default=str) + "\n"


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
    from opentelemetry import trace

    with tracer().start_as_current_span(
        name,
        kind=trace.SpanKind.PRODUCER,
        attributes={**_messaging(queue, message_id, tool_id), **(attributes or {})},
    ) as span:
        inject_current(headers)
        yield span


def headers_of(request: Any) -> dict[str, str]:
    """The trace headers of a Celery task request (custom headers land on the request
    itself, or under ``headers`` depending on Celery's message protocol path)."""
    found: dict[str, str] = {}
    nested = getattr(request, "headers", None)
    for key in (*TRACE_HEADERS, PUBLISHED_HEADER):
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
    expected: tuple[type[BaseException], ...] = (),
) -> Iterator[Any]:
    """A CONSUMER span for one delivery, a child of the context in ``carrier``. An
    exception of the ``expected`` kinds (a retry, a call that failed: outcomes, said by
    :func:`set_outcome`) is not recorded as the span's error; any other is (its type)."""
    from opentelemetry import propagate, trace

    parent = propagate.extract(dict(carrier))
    with tracer().start_as_current_span(
        name,
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={**_messaging(queue, message_id, tool_id), **(attributes or {})},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except expected:
            raise
        except BaseException as exc:
            # Its type only: a message or a stack could hold a call's input or env.
            span.add_event("exception", {"exception.type": type(exc).__name__})
            span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
            raise


def inject_current(headers: MutableMapping[str, Any]) -> None:
    """Put the current span's context into ``headers`` (a retry's next message), and
    the time of publication (its queue wait starts there)."""
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    headers.update({k: v for k, v in carrier.items() if k in TRACE_HEADERS})
    headers[PUBLISHED_HEADER] = repr(time.time())


def queue_wait(span: Any, carrier: Mapping[str, str], enqueued_at: Any = None) -> None:
    """A ``toolq.queue_wait`` child of ``span`` (an attempt or a chunk just picked up):
    from the message's publication to now. The publication time comes from the
    message's trace headers, else from the call's ``enqueued_at`` (a first attempt
    sent by a producer without tracing); without either, no span."""
    if span is None or not span.get_span_context().is_valid:
        return
    published: float | None = None
    try:
        published = float(carrier[PUBLISHED_HEADER])
    except (KeyError, ValueError):
        if isinstance(enqueued_at, int | float) and not isinstance(enqueued_at, bool):
            published = float(enqueued_at) or None
    if published is None:
        return
    end_ns = getattr(span, "start_time", None) or time.time_ns()
    start_ns = min(int(published * 1e9), end_ns)
    span_between("toolq.queue_wait", start_ns, end_ns, parent=span)


def span_between(
    name: str,
    start_ns: int,
    end_ns: int,
    *,
    parent: Any = None,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """A finished span for something that happened between two known times (epoch
    nanoseconds), a child of ``parent`` (default: the current span)."""
    from opentelemetry import trace

    if parent is None:
        parent = trace.get_current_span()
    if not parent.get_span_context().is_valid:
        return
    child = tracer().start_span(
        name,
        context=trace.set_span_in_context(parent),
        attributes=dict(attributes or {}),
        start_time=start_ns,
    )
    child.end(end_time=end_ns)


_OFF: AbstractContextManager[None] = nullcontext(None)


def step(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A child span of the current one around one step of a call (``toolq.cache``,
    ``toolq.flow``, ``toolq.breaker``); yields ``None`` (a shared no-op) when tracing is
    off or there is no current span to hang it under."""
    if not enabled():
        return _OFF
    return _step(name, attributes)


@contextmanager
def _step(name: str, attributes: Mapping[str, Any] | None) -> Iterator[Any]:
    from opentelemetry import trace

    if not trace.get_current_span().get_span_context().is_valid:
        yield None
        return
    with tracer().start_as_current_span(name, attributes=dict(attributes or {})) as span:
        yield span


def current_context() -> Any:
    """The current trace context (to carry onto another thread), or None when off."""
    if not enabled():
        return None
    from opentelemetry import context

    return context.get_current()


@contextmanager
def attempt_span(
    parent: Any,
    *,
    queue: str | None,
    message_id: str,
    tool_id: str | None,
    attempt: int,
    chunk_id: str,
) -> Iterator[Any]:
    """A chunk's call: a ``toolq.attempt`` span under ``parent`` (the chunk's context,
    from :func:`current_context`), current on this thread while the call runs; yields
    ``None`` and does nothing when tracing is off."""
    if parent is None:
        yield None
        return
    from opentelemetry import context, trace

    token = context.attach(parent)
    try:
        with tracer().start_as_current_span(
            "toolq.attempt",
            kind=trace.SpanKind.CONSUMER,
            attributes={
                **_messaging(queue, message_id, tool_id),
                "toolq.attempt": attempt,
                "toolq.chunk.id": chunk_id,
            },
        ) as span:
            yield span
    finally:
        context.detach(token)


def set_outcome(span: Any, outcome: str, error_kind: Any = None) -> None:
    """``toolq.outcome`` (succeeded, failed, retry, wait) and ``toolq.error.kind``."""
    if span is None:
        return
    span.set_attribute("toolq.outcome", outcome)
    if error_kind is not None:
        span.set_attribute("toolq.error.kind", str(error_kind))
    if outcome == "failed":
        from opentelemetry.trace import StatusCode

        span.set_status(StatusCode.ERROR, str(error_kind))


def set_current_outcome(outcome: str) -> None:
    """:func:`set_outcome` on the current span (the attempt deciding what comes next)."""
    if not enabled():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("toolq.outcome", outcome)


MAX_OUTPUT_EVENTS = 20
"""A run span's events: at most this many of the tool's last stderr lines..."""
MAX_OUTPUT_LINE = 512
"""...each cut to this many characters."""


def run_span(tool_id: str, mode: str | None = None) -> AbstractContextManager[Any]:
    """A ``toolq.run`` span around the runtime's run of one attempt (the current span's
    child); ``None`` and nothing else when tracing is off."""
    attributes: dict[str, Any] = {"toolq.tool_id": tool_id}
    if mode is not None:
        attributes["toolq.mode"] = mode
    return step("toolq.run", attributes)


def record_spawn(span: Any, launched_ns: tuple[int, int] | None) -> None:
    """A ``toolq.spawn`` child of a run span: the launch of the Bun process (its sandbox
    and cgroup) the call waited for, as the runtime timed it (``Outcome.launched_ns``);
    nothing for a warm process or one started ahead of the call."""
    if span is None or launched_ns is None:
        return
    span_between("toolq.spawn", launched_ns[0], launched_ns[1], parent=span)


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
