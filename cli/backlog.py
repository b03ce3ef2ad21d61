"""How many calls wait, per queue: the true backlog an autoscaler should see.

A queue is ten Redis lists, one per priority step (:func:`toolq.config.celery_app.
queue_lists`); a list holds messages, and a chunk message from ``map()`` /
``enqueue_many`` holds up to 100 calls. KEDA's Redis scaler runs ``LLEN`` on one list,
so it sees a tenth of the priorities and a chunk as one call. Here each list is read
in windows of :data:`WINDOW` messages by a Lua script that counts a chunk as the calls
its ``argsrepr`` header names (``(37 calls: …)``, written by
:func:`~toolq.config.celery_app.send_chunk`; a JSON string value cannot hold the
unescaped quote the pattern starts with, so a call's input cannot fake it); nothing
leaves Redis but two numbers per window, and no window holds Redis longer than a few
milliseconds. Past ``max_scan`` messages in one list the rest is estimated from the
calls per message seen so far (``exact`` False).

The age of the oldest call waiting: kombu pushes on the left and workers pop on the
right, so each list's oldest message is its last; its calls carry ``enqueued_at`` (their
first enqueue, on the producer's clock). Ten ``LINDEX`` per queue, decoded here.

Calls waiting on flow control (a cluster-wide slot or a rate token) are not in any
list: each is held by a worker until its turn (:mod:`toolq.workers.flow`); they are
counted from the waiting sets, per tool, under the tool's queue.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

import redis

from toolq.cli.status import flow_status
from toolq.config.celery_app import PRIORITY_STEPS, RUN_BATCH_TASK, queue_lists
from toolq.config.settings import Settings

WINDOW = 1000
"""Messages one script call reads."""
MAX_SCAN = 200_000
"""Messages read per list before the rest is estimated."""

_COUNT = f"""
local items = redis.call('LRANGE', KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
local calls = 0
for _, raw in ipairs(items) do
  local n = nil
  if string.find(raw, '"task": "{RUN_BATCH_TASK}"', 1, true) then
    n = tonumber(string.match(raw, '"argsrepr": "%((%d+) calls'))
  end
  calls = calls + (n or 1)
end
return {{#items, calls}}
"""


@dataclass
class QueueBacklog:
    """One queue: calls and messages per toolq priority (0 default .. 9 most urgent),
    and calls waiting on flow control per (tool, reason: ``slot`` or ``rate``)."""

    name: str
    calls: dict[int, int] = field(default_factory=dict)
    messages: dict[int, int] = field(default_factory=dict)
    waiting: dict[tuple[str, str], int] = field(default_factory=dict)
    exact: bool = True
    oldest_enqueued_at: float | None = None
    """When the oldest call in the lists was first enqueued (None: none, or unknown)."""

    @property
    def queued_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def waiting_calls(self) -> int:
        return sum(self.waiting.values())

    @property
    def total_calls(self) -> int:
        """Every call not yet started: queued plus waiting on flow control."""
        return self.queued_calls + self.waiting_calls


def count_list(
    client: redis.Redis, name: str, *, max_scan: int = MAX_SCAN, window: int = WINDOW
) -> tuple[int, int, bool]:
    """(messages, calls, exact) of one Redis list of a queue."""
    script = client.register_script(_COUNT)
    length = int(client.llen(name))
    limit = min(length, max_scan)
    seen = calls = 0
    while seen < limit:
        want = min(window, limit - seen)
        got, counted = (int(n) for n in script(keys=[name], args=[seen, seen + want - 1]))
        seen += got
        calls += counted
        if got < want:  # the list shrank under us (workers took calls): all read
            return seen, calls, True
    if seen >= length:
        return seen, calls, True
    per_message = calls / seen if seen else 1.0
    return length, calls + round((length - seen) * per_message), False


def queue_backlog(
    client: redis.Redis,
    settings: Settings,
    queue: str,
    *,
    max_scan: int = MAX_SCAN,
    flow: dict[str, Any] | None = None,
) -> QueueBacklog:
    """The backlog of one queue (see the module's docstring); ``flow``: a
    :func:`toolq.cli.status.flow_status` already read."""
    backlog = QueueBacklog(queue)
    for step, name in zip(PRIORITY_STEPS, queue_lists(queue), strict=True):
        messages, calls, exact = count_list(client, name, max_scan=max_scan)
        priority = 9 - step  # kombu's step 0 is served first: toolq's priority 9
        backlog.messages[priority] = messages
        backlog.calls[priority] = calls
        backlog.exact = backlog.exact and exact
        if messages:
            found = enqueued_at(client.lindex(name, -1))
            if found is not None and (
                backlog.oldest_enqueued_at is None or found < backlog.oldest_enqueued_at
            ):
                backlog.oldest_enqueued_at = found
    if flow is None:
        flow = flow_status(client, settings)
    backlog.waiting = flow_waiting(flow, settings, queue)
    return backlog


def enqueued_at(raw: bytes | str | None) -> float | None:
    """The earliest ``enqueued_at`` of the calls a queued message holds (a call, or a
    chunk's calls); None for anything else (a foreign or damaged message, or none)."""
    if raw is None:
        return None
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        calls = args[0] if args and isinstance(args[0], list) else args
        times = [
            (entry.get("call", entry) if isinstance(entry, dict) else {}).get("enqueued_at")
            for entry in calls
        ]
        found = [float(t) for t in times if isinstance(t, int | float)]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, binascii.Error):
        return None
    return min(found) if found else None


def flow_waiting(
    flow: dict[str, Any], settings: Settings, queue: str
) -> dict[tuple[str, str], int]:
    """Calls of ``queue``'s tools waiting for a cluster-wide slot or a rate token."""
    found: dict[tuple[str, str], int] = {}
    for entry in flow["slots"]:
        if settings.queue_for(entry["tool_id"]) == queue:
            key = (entry["tool_id"], "slot")
            found[key] = found.get(key, 0) + int(entry["waiting"])
    for entry in flow["rate"]:
        if settings.queue_for(entry["tool_id"]) == queue:
            found[(entry["tool_id"], "rate")] = int(entry["waiting"])
    return found


def backlog(
    client: redis.Redis, settings: Settings, queues: list[str] | None = None
) -> list[QueueBacklog]:
    """Every configured queue's backlog (or ``queues``')."""
    flow = flow_status(client, settings)
    return [queue_backlog(client, settings, q, flow=flow) for q in (queues or settings.all_queues)]
