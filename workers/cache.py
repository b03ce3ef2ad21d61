"""The result cache of tools that ask for one (``tools.<id>.cache: {ttl: 60s}``).

The key is a digest of the tool id, the input as the tool gets it and the effective
config — never the env: two callers with different secrets share an answer, and no
secret is ever part of a key or of what is stored. Only successes are stored (the
result and the id of the call that produced it); a failure is never replayed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from toolq.keys import Keys


def cache_digest(tool_id: str, tool_input: Any, config: Mapping[str, Any]) -> str:
    """The same tool, input and config, however their keys are ordered, give one digest."""
    canonical = json.dumps(
        [tool_id, tool_input, dict(config)], sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Cached:
    result: dict[str, Any] | None
    call_id: str
    """The call that ran the tool and produced this result."""


class ResultCache:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def get(self, digest: str) -> Cached | None:
        raw = self.client.get(self.keys.cache(digest))
        if not isinstance(raw, bytes):
            return None
        stored = json.loads(raw)
        return Cached(stored.get("result"), str(stored.get("call_id", "")))

    def put(self, digest: str, entry: Cached, ttl_s: float) -> None:
        payload = json.dumps({"result": entry.result, "call_id": entry.call_id})
        self.client.set(self.keys.cache(digest), payload, px=max(1, int(ttl_s * 1000)))
