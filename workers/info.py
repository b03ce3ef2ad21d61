"""What a worker tells ``toolq status`` about itself: whether its tools run sandboxed.

Written once when the worker starts (a Redis hash keyed by node name), removed when it
stops; ``toolq status`` reads the entries of the workers that answer its inspect, so an
entry a killed worker left behind is never shown. Nothing is sent per call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis

from toolq.keys import Keys

KEEP_S = 7 * 24 * 3600
"""The hash outlives its last writer this long (entries of killed workers go with it)."""


def sandbox_info(sandbox: str, mode: str) -> dict[str, Any]:
    """``sandbox``: what runs the tools ("bwrap" or "none"); ``mode``: runtime.sandbox."""
    return {"sandboxed": sandbox != "none", "sandbox": sandbox, "sandbox_mode": mode}


def publish(client: redis.Redis, keys: Keys, node: str, info: dict[str, Any]) -> None:
    client.hset(keys.worker_info, node, json.dumps(info))
    client.expire(keys.worker_info, KEEP_S)


def remove(client: redis.Redis, keys: Keys, node: str) -> None:
    client.hdel(keys.worker_info, node)


def read(client: redis.Redis, keys: Keys, nodes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The entries of ``nodes`` (a node without one, such as an older worker: absent)."""
    if not nodes:
        return {}
    found = {}
    for node, raw in zip(nodes, client.hmget(keys.worker_info, list(nodes)), strict=True):
        if raw is not None:
            try:
                found[node] = json.loads(raw)
            except ValueError:
                continue
    return found
