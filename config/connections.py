"""Redis connections for toolq's own keys (breakers, dead letters, idempotency).

Celery keeps its own broker and backend connections; this is the one place that
builds toolq's. Commands retry with backoff across a Redis restart.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from toolq.config.settings import Settings


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=5,
        socket_timeout=10,
        health_check_interval=25,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
