"""Cluster-wide flow control per tool: concurrency slots and a rate limit, in Redis.

A tool with neither configured never reaches this module (no Redis round trip).

**Slots** (``max_concurrency``, optionally per ``concurrency_key``) are leases: a sorted
set of call id -> lease expiry, on Redis' clock. A lease lasts the call's hard limit
plus :data:`LEASE_MARGIN_S` — the runtime has killed the call by then — so a worker
that dies (SIGKILL, OOM) gives its slot back when the lease runs out, without anyone
cleaning up. A call that finds no free slot joins a waiting list ordered by its
priority, then its first arrival (``enqueued_at``; :func:`waiter_order`), and is
re-published with a short countdown: it holds no worker slot while it waits. A slot goes
to a waiter only if fewer waiters are ahead of it than there are free slots, so calls
start in that order: a more urgent call passes every less urgent waiter, and within a
priority a call passes fewer earlier ones than there are slots. A waiter that
stops asking (its message lost, its worker gone) drops out of the list after
:data:`WAITER_STALE_S` past its next expected poll.

**Rate** (``rate_limit: "10/s"``) is GCRA with a burst of one: calls are spaced by the
interval, on Redis' clock. In ``queue`` mode a call over the rate *reserves* the next
free token and is re-published to run at exactly its time (so waiting calls keep
their order and never take two tokens); in ``reject`` mode it ends as ``rate_limited``.
A reservation is ordered by priority too: a call takes the token time of the first
holder of a lower priority, which moves (with every later holder) one interval back;
a holder back at its token's time confirms it (:meth:`Flow.confirm`) and waits again if
it was moved.

Each decision is one Lua script: one round trip to take, one to give back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from toolq.keys import Keys
from toolq.protocol import MAX_PRIORITY

LEASE_MARGIN_S = 2.0
"""A slot's lease outlives its call's hard limit by this much."""
SLOT_POLL_S = 0.2
"""How soon a waiter at the head of the list asks again."""
MAX_SLOT_POLL_S = 2.0
"""Waiters far back ask less often (the head ones will get the free slots first)."""
WAITER_STALE_S = 3.0
"""A waiter that has not asked again this long after it was due drops out of the list."""
_PRIORITY_STEP_S = 1e10
"""Waiters of one priority sort before all of the next: an arrival is an epoch time
(~2e9 s); a float keeps ~15 µs at this size (ties: by call id)."""
_KEY_TTL_MARGIN_MS = 60_000

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local holder, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local arrival, stale, ttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, member in ipairs(gone) do
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
end
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl) end
if redis.call('ZSCORE', KEYS[1], holder) then
  redis.call('ZADD', KEYS[1], now + lease, holder)
  return {1, 0, redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
end
local used = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[2], 'NX', arrival, holder)
local rank = redis.call('ZRANK', KEYS[2], holder)
if rank < limit - used then
  redis.call('ZREM', KEYS[2], holder)
  redis.call('ZREM', KEYS[3], holder)
  redis.call('ZADD', KEYS[1], now + lease, holder)
  return {1, 0, used + 1, redis.call('ZCARD', KEYS[2])}
end
local poll = math.min(tonumber(ARGV[7]) * (1 + math.floor(rank / limit)), tonumber(ARGV[8]))
redis.call('ZADD', KEYS[3], now + poll + stale, holder)
return {0, rank, used, redis.call('ZCARD', KEYS[2])}
"""
"""KEYS: slots, waiting, waiting-seen. ARGV: holder, limit, lease_s, arrival, stale_s,
key ttl ms, poll base s, poll max s (:func:`slot_poll_s`). Returns granted, rank among
waiters, slots in use, waiters."""

_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""

_TOKEN_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[3], member)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
"""
"""Holders whose token's time has come leave the reservations (both scripts start so)."""

_TOKEN = (
    _TOKEN_DUE
    + """
local interval, reserve, holder = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3]
local priority = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now
if wait > 0 and not reserve then
  return {0, tostring(wait), redis.call('ZCARD', KEYS[2])}
end
local at = tat
if wait > 0 then
  local held = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #held, 2 do
    if tonumber(redis.call('HGET', KEYS[3], held[i]) or '0') < priority then
      at = tonumber(held[i + 1])
      for j = #held - 1, i, -2 do
        redis.call('ZADD', KEYS[2], tonumber(held[j + 1]) + interval, held[j])
      end
      break
    end
  end
end
local ttl = math.ceil((tat + interval - now) * 1000) + 1000
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', ttl)
if wait > 0 then
  redis.call('ZADD', KEYS[2], at, holder)
  redis.call('HSET', KEYS[3], holder, priority)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {1, tostring(at - now), redis.call('ZCARD', KEYS[2])}
"""
)
"""GCRA, burst one; a reservation goes ahead of every holder of a lower priority. KEYS:
tat, rate-waiting, rate-priority. ARGV: interval_s, reserve (1/0), holder, priority.
Returns granted, wait (s, as text: Lua numbers become integers), holders of a future
token."""

_CONFIRM = (
    _TOKEN_DUE
    + """
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not at then return '0' end
return tostring(tonumber(at) - now)
"""
)
"""KEYS: tat, rate-waiting, rate-priority. ARGV: holder. Returns how long until its
token's time (s, as text): 0 once due (or never reserved)."""


@dataclass(frozen=True)
class FlowLimits:
    """A tool's flow control, resolved from ``tools.<id>`` (all None: none at all)."""

    max_concurrency: int | None = None
    key_path: tuple[str, ...] = ()
    """``concurrency_key: input.customer.id`` -> ``("customer", "id")``."""
    rate_interval_s: float | None = None
    reject_over_rate: bool = False
    cache_ttl_s: float | None = None

    @property
    def gated(self) -> bool:
        """Whether a call must ask Redis before it runs (a cap or a rate)."""
        return self.max_concurrency is not None or self.rate_interval_s is not None

    def slot_key(self, tool_input: Any) -> str | None:
        """The concurrency key's value in this input; ``""`` if it has none (one shared
        bucket for such calls); None when the cap is per tool."""
        if not self.key_path:
            return None
        value = tool_input
        for part in self.key_path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is None:
            return ""
        return value if isinstance(value, str) else repr(value)


def waiter_order(priority: int | None, arrival: float) -> float:
    """A waiter's place in a slot's waiting list: more urgent first, then first arrival."""
    return (MAX_PRIORITY - (priority or 0)) * _PRIORITY_STEP_S + arrival


def slot_poll_s(rank: int, limit: int) -> float:
    """When a waiter asks again: soon at the head of the list, less often further back."""
    return min(SLOT_POLL_S * (1 + rank // max(limit, 1)), MAX_SLOT_POLL_S)


@dataclass(frozen=True)
class SlotGrant:
    granted: bool
    rank: int
    """Waiters ahead of this call (0 when granted)."""
    in_use: int
    waiting: int


@dataclass(frozen=True)
class Token:
    granted: bool
    """False only in reject mode: no token now, and none was reserved."""
    wait_s: float
    """How long until the token's time (0: now)."""
    waiting: int
    """Calls holding a token of a future time (waiting for it)."""


class Flow:
    """Slots and rate tokens of every tool, in Redis (:mod:`toolq.keys` names them)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._token = client.register_script(_TOKEN)
        self._confirm = client.register_script(_CONFIRM)

    def _slot_keys(self, tool_id: str, key: str | None) -> list[str]:
        k = self.keys
        return [
            k.slots(tool_id, key),
            k.slot_waiting(tool_id, key),
            k.slot_waiting_seen(tool_id, key),
        ]

    def acquire(
        self,
        tool_id: str,
        key: str | None,
        holder: str,
        *,
        limit: int,
        lease_s: float,
        arrival: float,
        priority: int | None = None,
    ) -> SlotGrant:
        """Take a slot, or join (stay on) the waiting list in :func:`waiter_order`, keeping
        its place until it is due to ask again (:func:`slot_poll_s`) plus
        :data:`WAITER_STALE_S`; one round trip."""
        ttl_ms = int(max(lease_s, MAX_SLOT_POLL_S + WAITER_STALE_S) * 1000) + _KEY_TTL_MARGIN_MS
        granted, rank, in_use, waiting = self._acquire(
            keys=self._slot_keys(tool_id, key),
            args=[
                holder,
                limit,
                lease_s,
                repr(waiter_order(priority, arrival)),
                WAITER_STALE_S,
                ttl_ms,
                SLOT_POLL_S,
                MAX_SLOT_POLL_S,
            ],
        )
        return SlotGrant(bool(granted), int(rank), int(in_use), int(waiting))

    def release(self, tool_id: str, key: str | None, holder: str) -> int:
        """Give the slot back (or leave the waiting list); returns slots still in use."""
        return int(self._release(keys=self._slot_keys(tool_id, key), args=[holder]))

    def _rate_keys(self, tool_id: str) -> list[str]:
        k = self.keys
        return [k.rate(tool_id), k.rate_waiting(tool_id), k.rate_priority(tool_id)]

    def token(
        self,
        tool_id: str,
        holder: str,
        *,
        interval_s: float,
        reserve: bool,
        priority: int | None = None,
    ) -> Token:
        """A rate token now, or (``reserve``) the next free one, ahead of every reserved
        token of a less urgent call; one round trip."""
        granted, wait, waiting = self._token(
            keys=self._rate_keys(tool_id),
            args=[repr(interval_s), "1" if reserve else "0", holder, priority or 0],
        )
        return Token(bool(granted), max(0.0, float(wait)), int(waiting))

    def confirm(self, tool_id: str, holder: str) -> float:
        """How long the holder of a reserved token still waits: 0 once its time has come,
        more if a more urgent call took its place; one round trip."""
        return max(0.0, float(self._confirm(keys=self._rate_keys(tool_id), args=[holder])))
