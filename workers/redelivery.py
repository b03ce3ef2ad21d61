"""Count how often one attempt of a call was delivered, so a call that kills every
worker it reaches ends (as ``crashed``/WorkerLost) instead of looping forever."""

from __future__ import annotations

import redis

from toolq import keys


class Deliveries:
    def __init__(
        self, client: redis.Redis, ttl_s: float, namespace: keys.Keys = keys.DEFAULT
    ) -> None:
        self._redis = client
        self._keys = namespace
        self._ttl_s = max(1, int(ttl_s))

    def count(self, call_id: str, attempt: int) -> int:
        key = self._keys.deliveries(call_id, attempt)
        with self._redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, self._ttl_s)
            count, _ = pipe.execute()
        return int(count)
