"""Work around kombu's Redis transport losing a busy worker on a broker restart.

The bug (kombu 5.7.0, redis transport; repro: ``bench/kombu_restore_repro.py``).
When the connection drops, Celery's consumer calls ``Connection.collect()`` and then
``Connection.close()``:

1. ``collect()`` closes the default channel. ``redis.Channel.close()`` first drains the
   pending ``BRPOP`` (``_brpop_read``), which raises ``ConnectionError`` — Redis is gone —
   so the close stops half-way, the channel stays open, and ``maybe_close_channel`` swallows
   the error. ``collect()`` then sets ``transport.client = None``.
2. ``close()`` closes the channel again. This time it reaches
   ``virtual.Channel.close()`` -> ``QoS.restore_unacked_once()`` -> ``restore_unacked()``,
   which needs a Redis client; the channel's pool was just dropped, so it builds a new one
   from ``self.connection.client`` — now ``None``:
   ``AttributeError: 'NoneType' object has no attribute 'hostname'``. That is not a
   connection error, so it escapes ``ignore_errors`` and Celery stops the worker
   ("Unrecoverable error"). The same lookup fails later when a call that was running
   during the outage finishes and is acknowledged on its (now closed) channel.

It needs a delivered, unacknowledged message (a call running) at the moment the
connection drops while the channel waits in ``BRPOP`` (a slot free): "busy, not full".

The workaround, installed once per worker process by :func:`install`:

- a channel remembers the connection parameters it built its first pool with, and a
  closed channel reuses them, so a late acknowledgement reaches the restarted Redis;
- on a connection loss the unacknowledged calls are *not* pushed back to the queue by
  the closing channel: they are still running in this worker (Celery keeps running them),
  so restoring them would run them twice. They stay in Redis' unacked index; their
  acknowledgement removes them when they finish, and the visibility-timeout sweep
  redelivers them only if this worker dies first. (At a normal shutdown, restore still
  happens as before.)
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.transport import redis as _kombu_redis

kombu_redis: Any = _kombu_redis  # patched below: typed loosely on purpose

log = logging.getLogger("toolq.worker")

_installed = False


def install() -> None:
    """Patch kombu's Redis channel (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    original = kombu_redis.Channel._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> dict[str, Any]:
        connection = self.connection
        if connection is None or connection.client is None:
            saved = self.__dict__.get("_toolq_connparams")
            if saved is None:
                raise redis.ConnectionError("channel closed before it connected")
            return dict(saved)
        params: dict[str, Any] = original(self, asynchronous)
        if not asynchronous:
            self.__dict__["_toolq_connparams"] = dict(params)
        elif "_toolq_connparams" not in self.__dict__:
            self.__dict__["_toolq_connparams"] = dict(original(self, False))
        return params

    kombu_redis.Channel._connparams = _connparams


def keep_unacked_on_close(connection: Any) -> None:
    """Called as the consumer's connection is lost: its channel must not restore the
    calls this worker is still running (they would run twice)."""
    channel = getattr(connection, "_default_channel", None) if connection is not None else None
    qos = getattr(channel, "_qos", None)
    if qos is not None:
        running = len(getattr(qos, "_delivered", ()) or ())
        qos.restore_at_shutdown = False
        if running:
            log.warning(
                "broker connection lost with %d call(s) unacknowledged: they keep running "
                "here and are acknowledged when they finish",
                running,
            )
