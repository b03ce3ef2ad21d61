"""The dead-letter list: calls that failed after their last attempt, kept for a person.

Each entry holds what is needed to look at the failure and to replay it: tool id,
input, env (never printed), queue, timeout, the final error and the attempt
history. The list is bounded three ways, oldest entries evicted first, in one Lua
script so concurrent workers never overshoot: ``dead_letter_max`` entries,
``dead_letter_max_bytes`` bytes (with ``noeviction`` a full Redis stops everything) and
``dead_letter_ttl`` of age.

An entry keeps its input whole when the entry fits in a tenth of the byte budget (so
``toolq dlq replay`` can run it again). A larger one keeps a preview of its input
(``input_truncated: true``, ``input_bytes``) and trimmed error texts instead; replay
refuses it, since running it with a preview would be a different call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Protocol

import redis

from toolq import keys
from toolq.config.settings import Settings

PREVIEW_CHARS = 4096
"""What an oversized entry keeps of its input (JSON text) and of long error texts."""
ENTRY_SHARE = 10
"""One entry may use at most 1/ENTRY_SHARE of the byte budget."""
ReplaySelection = tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]
"""The entries to replay, and the others with why not (:meth:`DeadLetters.to_replay`)."""

_ADD = """
local id, entry = ARGV[1], ARGV[2]
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_entries, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local evicted = 0
local function drop(member)
  local size = tonumber(redis.call('HGET', KEYS[3], member) or '0') or 0
  redis.call('HDEL', KEYS[1], member)
  redis.call('HDEL', KEYS[3], member)
  redis.call('ZREM', KEYS[2], member)
  redis.call('DECRBY', KEYS[4], size)
end
if id ~= '' then
  drop(id)
  redis.call('HSET', KEYS[1], id, entry)
  redis.call('HSET', KEYS[3], id, #entry)
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('INCRBY', KEYS[4], #entry)
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - ttl))) do
  drop(member)
  evicted = evicted + 1
end
while true do
  local count = redis.call('ZCARD', KEYS[2])
  local total = tonumber(redis.call('GET', KEYS[4]) or '0') or 0
  if count == 0 then redis.call('SET', KEYS[4], 0) break end
  if (count <= max_entries and total <= max_bytes) or count <= 1 then break end
  drop(redis.call('ZRANGE', KEYS[2], 0, 0)[1])
  evicted = evicted + 1
end
local ms = math.floor(ttl * 1000)
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ms) end
return evicted
"""


class DeadLetters:
    def __init__(
        self,
        client: redis.Redis,
        max_entries: int,
        *,
        max_bytes: int = 64 * 1024**2,
        ttl_s: float = 7 * 24 * 3600.0,
        namespace: keys.Keys = keys.DEFAULT,
    ) -> None:
        self._redis = client
        self._keys = namespace
        self._all = [
            namespace.dead_letters,
            namespace.dead_letter_index,
            namespace.dead_letter_sizes,
            namespace.dead_letter_bytes,
        ]
        self._max = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._script: Any = client.register_script(_ADD)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> DeadLetters:
        return cls(
            client,
            settings.dead_letter_max,
            max_bytes=settings.dead_letter_max_bytes,
            ttl_s=settings.dead_letter_ttl_s,
            namespace=settings.keys,
        )

    @property
    def max_entry_bytes(self) -> int:
        return max(1024, self.max_bytes // ENTRY_SHARE)

    def add(self, entry: dict[str, Any]) -> int:
        """Store one entry (replacing one with the same id); return how many were evicted."""
        call_id = str(entry["id"])
        now = time.time()
        entry = fit(
            {**entry, "failed_at": now},
            self.max_entry_bytes,
        )
        data = json.dumps(entry)
        return int(
            self._script(
                keys=self._all,
                args=[call_id, data, now, self.ttl_s, self._max, self.max_bytes],
            )
        )

    def trim(self) -> int:
        """Evict what is over age or budget now (adding does this too)."""
        return int(
            self._script(
                keys=self._all, args=["", "", time.time(), self.ttl_s, self._max, self.max_bytes]
            )
        )

    def list(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        self.trim()
        ids: Any = self._redis.zrevrange(
            self._keys.dead_letter_index, 0, -1 if limit is None else limit - 1
        )
        if not ids:
            return []
        raw = self._redis.hmget(self._keys.dead_letters, ids)
        return [json.loads(item) for item in raw if item is not None]

    def get(self, call_id: str) -> dict[str, Any] | None:
        raw = self._redis.hget(self._keys.dead_letters, call_id)
        if raw is None:
            return None
        entry: dict[str, Any] = json.loads(raw)
        if float(entry.get("failed_at", 0)) < time.time() - self.ttl_s:
            return None
        return entry

    def remove(self, call_id: str) -> bool:
        with self._redis.pipeline() as pipe:
            pipe.hdel(self._keys.dead_letters, call_id)
            pipe.zrem(self._keys.dead_letter_index, call_id)
            pipe.hget(self._keys.dead_letter_sizes, call_id)
            pipe.hdel(self._keys.dead_letter_sizes, call_id)
            removed, _, size, _ = pipe.execute()
        if size:
            self._redis.decrby(self._keys.dead_letter_bytes, int(size))
        return bool(removed)

    def count(self) -> int:
        return int(self._redis.zcard(self._keys.dead_letter_index))

    def bytes_used(self) -> int:
        return int(self._redis.get(self._keys.dead_letter_bytes) or 0)

    def purge(self) -> int:
        count = self.count()
        self._redis.delete(*self._all)
        return count

    def to_replay(self, call_id: str | None) -> ReplaySelection:
        """What ``toolq dlq replay`` runs again, one call's entry (``call_id``) or every
        entry (None): the replayable entries, and the others with why not (both empty:
        no such entry)."""
        found = self.list() if call_id is None else [self.get(call_id)]
        entries = [entry for entry in found if entry is not None]
        refused = [
            (entry, reason)
            for entry in entries
            if (reason := not_replayable_reason(entry)) is not None
        ]
        return [entry for entry in entries if replayable(entry)], refused

    def replay(self, entry: dict[str, Any], enqueue: Enqueue) -> str:
        """Enqueue a replayable entry again (a fresh call: a new id, fresh attempts) with
        the producer's ``enqueue``, its sealed env passed on unopened (no key needed),
        then remove the entry; the new call's id."""
        call = enqueue(
            entry["tool_id"],
            entry.get("input"),
            entry.get("env"),
            entry.get("timeout"),
            entry.get("queue"),
            config=entry.get("config"),
            sealed_env=entry.get("env_sealed"),
        )
        self.remove(entry["id"])
        return call.id


class Enqueued(Protocol):
    @property
    def id(self) -> str: ...


class Enqueue(Protocol):
    """``ToolClient.enqueue``'s shape, as :meth:`DeadLetters.replay` uses it (passed in:
    workers import nothing from producers)."""

    def __call__(
        self,
        tool_id: str,
        input: Any = None,
        env: Mapping[str, str] | None = None,
        timeout: float | str | None = None,
        queue: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        sealed_env: str | None = None,
    ) -> Enqueued: ...


def not_replayable_reason(entry: dict[str, Any]) -> str | None:
    """Why ``toolq dlq replay`` must not run this entry again (``None``: it may)."""
    if entry.get("input_truncated"):
        return (
            f"its input ({entry.get('input_bytes')} bytes) was too large for the dead-letter "
            "budget and only a preview was kept (dead_letter_max_bytes / 10 per entry)"
        )
    if entry.get("retry_stopped") == "poison" and not entry.get("tool_id"):
        return "it is a poison message with no readable tool call"
    return None


def replayable(entry: dict[str, Any]) -> bool:
    return not_replayable_reason(entry) is None


def fit(entry: dict[str, Any], limit: int) -> dict[str, Any]:
    """The entry itself if its JSON fits in ``limit`` bytes, else a trimmed copy that does."""
    if _size(entry) <= limit:
        return entry
    trimmed = dict(entry)
    if "input" in trimmed:
        text = json.dumps(trimmed["input"])
        trimmed["input"] = text[:PREVIEW_CHARS]
        trimmed["input_truncated"] = True
        trimmed["input_bytes"] = len(text.encode())
    if isinstance(trimmed.get("error"), dict):
        trimmed["error"] = {k: _short(v) for k, v in trimmed["error"].items()}
    trimmed["attempt_history"] = [
        {k: _short(v) for k, v in item.items()} if isinstance(item, dict) else item
        for item in trimmed.get("attempt_history") or []
    ][-20:]
    if isinstance(trimmed.get("poison"), dict):
        trimmed["poison"] = {k: _short(v) for k, v in trimmed["poison"].items()}
    if _size(trimmed) <= limit:
        return trimmed
    # Still too big (a huge env or history): keep only what identifies the failure.
    minimal = {
        key: trimmed.get(key)
        for key in ("id", "tool_id", "queue", "attempts", "retry_stopped", "worker", "failed_at")
    }
    error = trimmed.get("error") or {}
    minimal["error"] = {
        "kind": error.get("kind"),
        "name": error.get("name"),
        "message": str(error.get("message", ""))[:512],
    }
    minimal["input"] = str(trimmed.get("input", ""))[:512]
    minimal.update({"input_truncated": True, "input_bytes": trimmed.get("input_bytes")})
    minimal["env"] = {}
    minimal["env_dropped"] = True
    return minimal


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > PREVIEW_CHARS:
        return value[:PREVIEW_CHARS] + "…"
    if isinstance(value, dict | list):
        text = json.dumps(value, default=repr)
        return value if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"
    return value


def _size(entry: dict[str, Any]) -> int:
    return len(json.dumps(entry).encode())
