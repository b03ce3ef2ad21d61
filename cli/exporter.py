"""`toolq exporter`: the true backlog per queue as Prometheus metrics, for autoscalers.

One small process per project (not one per worker): on each scrape it reads the
backlog from Redis (:mod:`toolq.cli.backlog`; at most once per ``min_interval_s``, so
several scrapers cost one read), the live workers per queue (the presence sets the
workers' heartbeats keep, :mod:`toolq.presence`) and the dead letters. Never a
broadcast to the workers.

Metrics (every name is listed in :data:`METRIC_NAMES`):

- ``toolq_backlog_calls{queue,priority}``: calls waiting in the queue's lists, a chunk
  counted as the calls it holds; what a worker fleet should scale on;
- ``toolq_backlog_messages{queue,priority}``: the same as Celery messages;
- ``toolq_flow_waiting_calls{queue,tool_id,reason}``: calls held back by flow control
  (``slot``: a cluster-wide slot, ``rate``: a rate token); more workers do not start
  them sooner;
- ``toolq_backlog_oldest_age_seconds{queue}``: how long the oldest call waiting in the
  queue's lists has waited since it was first enqueued (0: none waits); the queue's age,
  whether or not any call starts;
- ``toolq_backlog_exact{queue}``: 0 when a list was too long to read whole and its
  rest was estimated;
- ``toolq_live_workers{queue}``: workers that consumed the queue and beat in the last
  10 s;
- ``toolq_dead_letter_entries``: calls in the project's dead-letter list;
- ``toolq_exporter_up``: 1 when the last read from Redis succeeded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from toolq.cli.backlog import QueueBacklog, backlog
from toolq.config.connections import close_redis, redis_client
from toolq.config.settings import Settings
from toolq.presence import live_workers
from toolq.workers.deadletter import DeadLetters

log = logging.getLogger("toolq.exporter")

DEFAULT_PORT = 9541
METRIC_NAMES = (
    "toolq_backlog_calls",
    "toolq_backlog_messages",
    "toolq_flow_waiting_calls",
    "toolq_backlog_oldest_age_seconds",
    "toolq_backlog_exact",
    "toolq_live_workers",
    "toolq_dead_letter_entries",
    "toolq_exporter_up",
)


class BacklogCollector(Collector):
    """Reads Redis when scraped (at most once per ``min_interval_s``)."""

    def __init__(
        self, settings: Settings, queues: list[str] | None = None, min_interval_s: float = 5.0
    ) -> None:
        self.settings = settings
        self.queues = queues or settings.all_queues
        self.min_interval_s = min_interval_s
        # A scrape answers at once: Redis away is toolq_exporter_up 0, never a hung scrape.
        self._client = redis_client(settings, ride_out_restarts=False)
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._last: list[Metric] = []

    def close(self) -> None:
        close_redis(self._client)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if time.monotonic() - self._read_at >= self.min_interval_s:
                self._last = self._read()
                self._read_at = time.monotonic()
            yield from self._last

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "toolq_exporter_up", "1 when the exporter's last read from Redis succeeded."
        )
        try:
            found = backlog(self._client, self.settings, self.queues)
            seconds, micros = self._client.time()
            now = seconds + micros / 1e6
            live = {q: live_workers(self._client, q) for q in self.queues}
            dead = DeadLetters.from_settings(self._client, self.settings).count()
        except RedisError as exc:
            log.warning("cannot read the backlog from Redis: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [*_families(found, live, dead, now), up]


def _families(
    found: list[QueueBacklog], live: dict[str, int], dead: int, now: float
) -> list[Metric]:
    calls = GaugeMetricFamily(
        "toolq_backlog_calls",
        "Calls waiting in a queue's Redis lists (a chunk counts as its calls), by priority.",
        labels=["queue", "priority"],
    )
    messages = GaugeMetricFamily(
        "toolq_backlog_messages",
        "Celery messages waiting in a queue's Redis lists, by priority.",
        labels=["queue", "priority"],
    )
    waiting = GaugeMetricFamily(
        "toolq_flow_waiting_calls",
        "Calls held back by flow control (a cluster-wide slot or a rate token).",
        labels=["queue", "tool_id", "reason"],
    )
    age = GaugeMetricFamily(
        "toolq_backlog_oldest_age_seconds",
        "Seconds since the oldest call waiting in the queue was first enqueued (0: none).",
        labels=["queue"],
    )
    exact = GaugeMetricFamily(
        "toolq_backlog_exact",
        "0 when a list was too long to read whole and the rest was estimated.",
        labels=["queue"],
    )
    workers = GaugeMetricFamily(
        "toolq_live_workers",
        "Workers that consume the queue and sent a heartbeat in the last 10 s.",
        labels=["queue"],
    )
    for queue in found:
        for priority in sorted(queue.calls):
            calls.add_metric([queue.name, str(priority)], queue.calls[priority])
            messages.add_metric([queue.name, str(priority)], queue.messages[priority])
        for (tool_id, reason), count in sorted(queue.waiting.items()):
            waiting.add_metric([queue.name, tool_id, reason], count)
        oldest = queue.oldest_enqueued_at
        age.add_metric([queue.name], 0.0 if oldest is None else max(0.0, now - oldest))
        exact.add_metric([queue.name], 1 if queue.exact else 0)
        workers.add_metric([queue.name], live.get(queue.name, 0))
    dead_letters = GaugeMetricFamily(
        "toolq_dead_letter_entries", "Calls in the project's dead-letter list."
    )
    dead_letters.add_metric([], dead)
    return [calls, messages, waiting, age, exact, workers, dead_letters]


def registry_for(
    settings: Settings, queues: list[str] | None = None, min_interval_s: float = 5.0
) -> tuple[CollectorRegistry, BacklogCollector]:
    registry = CollectorRegistry()
    collector = BacklogCollector(settings, queues, min_interval_s)
    registry.register(collector)
    return registry, collector


def serve_forever(
    settings: Settings,
    *,
    port: int = DEFAULT_PORT,
    address: str = "127.0.0.1",
    queues: list[str] | None = None,
    min_interval_s: float = 5.0,
) -> None:
    """Serve ``/metrics`` on ``address:port`` until the process is told to stop."""
    registry, collector = registry_for(settings, queues, min_interval_s)
    server, thread = start_http_server(port, address, registry=registry)
    log.info("toolq exporter serving /metrics on %s:%d", address, port)
    stop = threading.Event()
    try:
        stop.wait()
    finally:
        server.shutdown()
        thread.join()
        collector.close()
