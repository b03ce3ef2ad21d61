"""A call's message as Redis holds it, built by Celery and kombu without a connection.

The synchronous client publishes with ``app.send_task``: Celery builds the task message
(:func:`toolq.config.celery_app.send_call` and ``send_chunk`` add toolq's headers and
the signature), kombu's Redis transport encodes it and ``LPUSH``es it onto the list of
its priority. The asyncio client must send exactly that message, without a thread and
without a second copy of that code: it runs the *same* ``send_call``/``send_chunk`` on a
Celery app whose broker is :class:`CaptureTransport`, a kombu virtual transport whose
``_put`` records ``(list, entry)`` instead of pushing it, then pushes the entry itself
with ``redis.asyncio``. Celery, kombu and toolq's signing run as they do for the sync
client; only the last step, the ``LPUSH``, differs. (Celery's producer pool would open a
connection to build a channel: this transport has nothing to connect to.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from kombu.transport import virtual
from kombu.utils.json import dumps

from toolq.config.celery_app import make_celery, queue_lists
from toolq.config.settings import Settings

_captured = threading.local()


class _CaptureChannel(virtual.Channel):
    do_restore = False
    supports_fanout = False

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        # kombu's Redis transport: LPUSH dumps(message) onto the list of its priority
        # step (kombu.transport.redis.Channel._put); toolq's steps are 0..9, one list each.
        priority = self._get_message_priority(message, reverse=False)  # type: ignore[no-untyped-call]
        entries: list[tuple[str, str]] | None = getattr(_captured, "entries", None)
        if entries is None:
            raise RuntimeError("a capture app's message was sent outside capture()")
        entries.append((queue_lists(queue)[priority], dumps(message)))  # type: ignore[no-untyped-call]

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        raise NotImplementedError("the capture transport only records messages")

    def _purge(self, queue: str) -> int:
        return 0

    def _size(self, queue: str) -> int:
        return 0


class CaptureTransport(virtual.Transport):
    """A kombu transport that records what would be pushed to Redis (see the module)."""

    Channel = _CaptureChannel
    driver_type = "redis"
    driver_name = "toolq-capture"

    def driver_version(self) -> str:
        return "N/A"


def capture_app(settings: Settings) -> Celery:
    """A Celery app configured as the producer's (:func:`make_celery`) but whose broker
    records messages: its result backend is the real one (for encoding results only)."""
    app = make_celery(settings, name="toolq-producer")
    app.conf.broker_url = "memory://"  # parsed for nothing; the transport below is used
    app.conf.broker_transport = CaptureTransport
    app.conf.broker_transport_options = {
        key: value
        for key, value in app.conf.broker_transport_options.items()
        if key in ("priority_steps", "sep")
    }
    backend: Any = app.backend
    backend.on_task_call = lambda *args, **kwargs: None  # no subscription at send
    return app


@contextmanager
def capture() -> Iterator[list[tuple[str, str]]]:
    """Within the block, a capture app's sends are recorded here (this thread's)."""
    outer = getattr(_captured, "entries", None)
    entries: list[tuple[str, str]] = []
    _captured.entries = entries
    try:
        yield entries
    finally:
        _captured.entries = outer


def entries_of(send: Callable[[], Any]) -> list[tuple[str, str]]:
    """The ``(Redis list, entry)`` pairs that ``send`` (a send on a capture app) makes."""
    with capture() as entries:
        send()
    return entries
