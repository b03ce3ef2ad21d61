"""Cutting a list of calls into chunk messages (``enqueue_many``, sync and asyncio).

Every call keeps its own id and request; a chunk is one message to Celery holding up to
``chunk_size`` calls (by default up to :data:`MAX_AUTO_CHUNK`, fewer for short lists so
that at least :data:`MIN_CHUNKS` messages spread over the workers), and never more than
:data:`CHUNK_MAX_BYTES` of them (a bigger call goes alone).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from toolq.errors import InvalidInput
from toolq.protocol import MAX_CHUNK_CALLS, CallRequest, ChunkEntry

MAX_AUTO_CHUNK = 100
"""The most calls a chunk holds unless ``chunk_size`` says otherwise."""
MIN_CHUNKS = 16
"""A short list is cut into at least this many chunks (of one call, at the least), so
that its calls spread over several workers' slots."""
CHUNK_MAX_BYTES = 1024 * 1024
"""A chunk message holds at most this much of calls (a bigger call goes alone)."""


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Calls cut into chunk messages (:func:`plan_chunks`)."""

    chunks: list[list[ChunkEntry]]
    requests: dict[str, CallRequest]
    """Each call's request by its new call id, in input order."""


def plan_chunks(requests: Sequence[CallRequest], sealer: Any, chunk_size: int | None) -> ChunkPlan:
    """Give each request a call id and cut them into chunks of ``chunk_size`` calls (by
    default up to :data:`MAX_AUTO_CHUNK`, fewer for short lists so that at least
    :data:`MIN_CHUNKS` messages spread over the workers), ``CHUNK_MAX_BYTES`` at most."""
    if chunk_size is not None and not 1 <= chunk_size <= MAX_CHUNK_CALLS:
        raise InvalidInput(f"chunk_size must be 1 to {MAX_CHUNK_CALLS}", "ValidationError")
    size = chunk_size or min(MAX_AUTO_CHUNK, max(1, -(-len(requests) // MIN_CHUNKS)))
    entries, by_id = [], {}
    for request in requests:
        message = request.to_message(sealer)
        nbytes = len(json.dumps(message, separators=(",", ":"), default=str))
        entry = ChunkEntry(str(uuid.uuid4()), message)
        entries.append((entry, nbytes))
        by_id[entry.call_id] = request
    return ChunkPlan(list(_chunks(entries, size, CHUNK_MAX_BYTES)), by_id)


def _chunks(
    entries: list[tuple[ChunkEntry, int]], size: int, max_bytes: int
) -> Iterator[list[ChunkEntry]]:
    """Calls grouped ``size`` at a time, and never more than ``max_bytes`` of messages
    in one (a call bigger than that goes alone)."""
    chunk: list[ChunkEntry] = []
    used = 0
    for entry, nbytes in entries:
        if chunk and (len(chunk) >= size or used + nbytes > max_bytes):
            yield chunk
            chunk, used = [], 0
        chunk.append(entry)
        used += nbytes
    if chunk:
        yield chunk
