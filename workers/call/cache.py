"""Step 3, cache: a tool that caches answers a repeated call from the stored result of
an earlier success, without a token, a slot or a run; a success is stored for the next.

A cache that cannot answer is a miss (logged): it never fails a call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from toolq import tracing
from toolq.workers.cache import Cached, cache_digest
from toolq.workers.call.attempt import Attempt, Ended
from toolq.workers.call.ports import CacheStore
from toolq.workers.metrics import Metrics
from toolq.workers.runtime.base import Outcome

log = logging.getLogger("toolq.worker")


@dataclass
class ResultReuse:
    """Looks a call up in the result cache, and stores a success there."""

    cache: CacheStore | None
    metrics: Metrics

    def key(self, attempt: Attempt) -> str | None:
        """The cache key of a call whose tool caches (and that did not opt out)."""
        request, profile = attempt.request, attempt.profile
        if profile.flow.cache_ttl_s is None or self.cache is None or not request.cache:
            return None
        return cache_digest(request.tool_id, request.input, profile.config_for(request))

    def lookup(self, key: str | None, attempt: Attempt) -> Ended | None:
        """The call's end from a stored result, or None to run it."""
        if key is None:
            return None
        assert self.cache is not None
        with tracing.step("toolq.cache") as span:
            try:
                hit = self.cache.get(key)
            except Exception:  # a cache that cannot answer is a miss
                log.warning("result cache unavailable for %s; running the tool", attempt.tool_id)
                hit = None
            if span is not None:
                span.set_attribute("toolq.cache.hit", hit is not None)
        if hit is None:
            return None
        self.metrics.cache_hits.labels(attempt.tool_id).inc()
        return Ended(Outcome(hit.result, None, 0, 0), cached=hit)

    def store(self, key: str | None, attempt: Attempt, outcome: Outcome) -> None:
        ttl_s = attempt.profile.flow.cache_ttl_s
        if key is None or ttl_s is None:
            return
        assert self.cache is not None
        try:
            self.cache.put(key, Cached(outcome.result, attempt.call_id), ttl_s)
        except Exception:
            log.warning("cannot cache %s's result", attempt.tool_id)
