"""Work around two faults of kombu's Redis transport: a busy worker lost on a broker
restart, and calls lost to a worker that died while waiting for work.

The bug (kombu 5.7.0, redis transport; repro: ``bench/investigations/kombu_restore_repro.py``).
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

**Reliable pop** (issue 31). kombu takes a call off the queue with ``BRPOP`` and records
it as unacknowledged afterwards, from the worker (``QoS.append``). Redis hands a call to a
pending ``BRPOP`` whenever its connection is open: a worker SIGKILLed while idle (whose
socket the kernel has not closed yet), a frozen or unplugged host (whose socket stays
open until TCP gives up). Redis writes the call to that socket and forgets it: it is in
neither the queue nor the unacked index, and no sweep ever finds it (4 of 5 trials of
"SIGKILL an idle worker, enqueue at once" lost the call; SIGSTOP, enqueue, SIGKILL loses
it every time). A worker therefore takes calls with one Lua script (:data:`POP_SCRIPT`)
that pops the first waiting entry of its lists *and* records it in the unacked hash and
index, in one atomic step: from then on the visibility sweep redelivers it if the worker
never acknowledges it, whatever happened to the reply. A script cannot block, so an idle
worker waits with ``BLMOVE list list RIGHT RIGHT`` (which moves the tail back onto
itself: it waits for an entry without taking it) on the list toolq's default priority
goes to, with the pop pipelined behind it, then pops. A call with another priority, or on
another of the worker's queues, that reaches an idle worker is therefore taken within
:data:`IDLE_WAIT_S` (about 0.1 s at most: Redis times a blocked command out on its 10 Hz
clock), not at once: a priority-9 call to an idle worker took p50 53 ms here against
6.7 ms with BRPOP; default-priority calls are unchanged (``bench/investigations/idle_pickup.py``).
A worker that found a call pops again without waiting.
Needs Redis 6.2 (``BLMOVE``); against an older Redis the worker keeps kombu's ``BRPOP``
and says so in its log.
"""

from __future__ import annotations

import logging
from time import monotonic, time
from typing import Any

import redis
from kombu.transport import redis as _kombu_redis
from kombu.transport import virtual as _virtual

kombu_redis: Any = _kombu_redis  # patched below: typed loosely on purpose
virtual: Any = _virtual

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
    kombu_redis.Channel._brpop_start = _pop_start
    kombu_redis.Channel._brpop_read = _pop_read
    kombu_redis.QoS.append = _qos_append


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


# -- reliable pop ---------------------------------------------------------------------------

POP_SCRIPT = """
-- KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3..] the lists, in poll order;
-- ARGV[1] now (the worker's clock, as kombu's visibility sweep reads it).
-- Returns {list, entry, recorded} or nil. An entry that is not a kombu message (no
-- delivery tag, exchange, routing key) is returned unrecorded: poison, refused by the
-- worker as before.
for i = 3, #KEYS do
  local entry = redis.call('RPOP', KEYS[i])
  if entry then
    local ok, message = pcall(cjson.decode, entry)
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      local tag = message.properties.delivery_tag
      local info = message.properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table'
          and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        redis.call('HSET', KEYS[1], tag, '[' .. entry .. ',' .. cjson.encode(info.exchange)
          .. ',' .. cjson.encode(info.routing_key) .. ']')
        return {KEYS[i], entry, 1}
      end
    end
    return {KEYS[i], entry, 0}
  end
end
return nil
"""
"""Pop the first waiting entry of the lists and record it as unacknowledged, atomically
(what ``BRPOP`` followed by kombu's ``QoS.append`` does in two steps)."""

IDLE_WAIT_S = 0.05
"""How long an idle worker's ``BLMOVE`` waits before it pops again (so a call on a list it
is not waiting on is taken within this, or Redis' next clock tick: 0.1 s at 10 Hz). An
idle worker makes 10-20 such round trips a second (0.75 % of a core here, 0.4 % with
BRPOP's 1 s)."""

DEFAULT_STEP = -1
"""The priority list an idle worker waits on: toolq's default priority 0 is kombu's last
step (its most urgent, toolq's 9, is step 0)."""


def _reliable(channel: Any) -> bool:
    """Whether this channel pops with :data:`POP_SCRIPT` (Redis 6.2+, no key prefix)."""
    known = channel.__dict__.get("_toolq_reliable")
    if known is None:
        known = False
        if not channel.global_keyprefix:
            try:
                version = str(channel.client.info("server").get("redis_version", "0"))
            except redis.ResponseError:  # INFO renamed away: assume nothing
                version = "unknown"
            parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
            known = parts >= (6, 2)
            if not known:
                log.warning(
                    "Redis version %s: BLMOVE needs 6.2; this worker takes calls with BRPOP, "
                    "and a call sent as a worker dies while waiting for work can be lost",
                    version,
                )
        channel.__dict__["_toolq_reliable"] = known
    return bool(known)


def _pop_start(self: Any, timeout: Any = None) -> None:
    """kombu's ``_brpop_start``: sends the pop (after a wait, if the last pop was empty)."""
    if not _reliable(self):
        _ORIGINAL_START(self, timeout)
        return None
    queues = self._queue_cycle.consume(len(self.active_queues))
    if not queues:
        return None
    lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
    connection = self.client.connection
    commands: list[tuple[Any, ...]] = []
    waited = bool(self.__dict__.get("_toolq_idle"))
    if waited:
        wait = timeout if timeout is not None else self.brpop_timeout
        wait = min(float(wait or IDLE_WAIT_S), IDLE_WAIT_S)
        bell = self._q_for_pri(queues[0], self.priority_steps[DEFAULT_STEP])
        commands.append(("BLMOVE", bell, bell, "RIGHT", "RIGHT", wait))
    commands.append(
        (
            "EVAL",
            POP_SCRIPT,
            2 + len(lists),
            self.unacked_key,
            self.unacked_index_key,
            *lists,
            time(),
        )
    )
    self.__dict__["_toolq_waited"] = waited
    self._in_poll = connection
    self._brpop_sent_at = monotonic()
    connection.send_packed_command(connection.pack_commands(commands))
    return None


def _pop_read(self: Any, **options: Any) -> bool:
    """kombu's ``_brpop_read``: reads what :func:`_pop_start` sent; delivers a call."""
    if not _reliable(self):
        return bool(_ORIGINAL_READ(self, **options))
    client = self.client
    try:
        try:
            if self.__dict__.pop("_toolq_waited", False):
                client.parse_response(client.connection, "BLMOVE", **options)
            reply = client.parse_response(client.connection, "EVAL", **options)
        except self.connection_errors:
            client.connection.disconnect()
            raise
        if not reply:
            self.__dict__["_toolq_idle"] = True
            raise kombu_redis.Empty()
        self.__dict__["_toolq_idle"] = False
        key, entry, recorded = reply
        dest = _text(key).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(dest)
        raw = kombu_redis.loads(_text(entry))
        tag = _tag_of(raw) if recorded else None
        if tag is not None:
            self.__dict__.setdefault("_toolq_recorded", set()).add(tag)
        try:
            self.connection._deliver(raw, dest)
        finally:
            if tag is not None and tag in self.__dict__["_toolq_recorded"]:
                # Nobody took it in (refused as poison before kombu made a message of
                # it): dropping it is its acknowledgement, as it was with BRPOP.
                self._toolq_recorded.discard(tag)
                self.qos._remove_from_indices(tag).execute()
        return True
    finally:
        self._in_poll = None
        self._flush_brpop_reauth()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _tag_of(raw: Any) -> str | None:
    properties = raw.get("properties") if isinstance(raw, dict) else None
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    return tag if isinstance(tag, str) else None


def _qos_append(self: Any, message: Any, delivery_tag: Any) -> None:
    """kombu's ``QoS.append``: a call the pop script recorded is not written again."""
    recorded = self.channel.__dict__.get("_toolq_recorded")
    if recorded is not None and delivery_tag in recorded:
        recorded.discard(delivery_tag)
        virtual.QoS.append(self, message, delivery_tag)
        return
    _ORIGINAL_APPEND(self, message, delivery_tag)


_ORIGINAL_START = kombu_redis.Channel._brpop_start
_ORIGINAL_READ = kombu_redis.Channel._brpop_read
_ORIGINAL_APPEND = kombu_redis.QoS.append
