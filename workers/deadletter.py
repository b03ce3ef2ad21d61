"""The dead-letter list: calls that failed after their last attempt, kept for a person.

Each entry holds what is needed to look at the failure and to replay it: tool id,
input, env (never printed), queue, timeout, the final error and the attempt
history. The list is capped (``dead_letter_max``); the oldest entries go first.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from toolq import keys


class DeadLetters:
    def __init__(
        self, client: redis.Redis, max_entries: int, namespace: keys.Keys = keys.DEFAULT
    ) -> None:
        self._redis = client
        self._keys = namespace
        self._max = max_entries

    def add(self, entry: dict[str, Any]) -> None:
        call_id = str(entry["id"])
        entry = {**entry, "failed_at": time.time()}
        with self._redis.pipeline() as pipe:
            pipe.hset(self._keys.dead_letters, call_id, json.dumps(entry))
            pipe.zadd(self._keys.dead_letter_index, {call_id: entry["failed_at"]})
            pipe.zcard(self._keys.dead_letter_index)
            size = int(pipe.execute()[-1])
        if size > self._max:
            oldest: Any = self._redis.zpopmin(self._keys.dead_letter_index, size - self._max)
            if oldest:
                self._redis.hdel(self._keys.dead_letters, *[member for member, _ in oldest])

    def list(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        ids: Any = self._redis.zrevrange(
            self._keys.dead_letter_index, 0, -1 if limit is None else limit - 1
        )
        if not ids:
            return []
        raw = self._redis.hmget(self._keys.dead_letters, ids)
        return [json.loads(item) for item in raw if item is not None]

    def get(self, call_id: str) -> dict[str, Any] | None:
        raw = self._redis.hget(self._keys.dead_letters, call_id)
        return json.loads(raw) if raw is not None else None

    def remove(self, call_id: str) -> bool:
        with self._redis.pipeline() as pipe:
            pipe.hdel(self._keys.dead_letters, call_id)
            pipe.zrem(self._keys.dead_letter_index, call_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def count(self) -> int:
        return int(self._redis.zcard(self._keys.dead_letter_index))

    def purge(self) -> int:
        count = self.count()
        self._redis.delete(self._keys.dead_letters, self._keys.dead_letter_index)
        return count
