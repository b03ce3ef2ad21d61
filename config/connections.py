"""Redis connections for toolq's own keys (breakers, dead letters, idempotency).

Celery keeps its own broker and backend connections; this is the one place that
builds toolq's. Commands retry with backoff across a Redis restart.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from toolq.config.settings import Settings


def redis_client(settings: Settings, *, ride_out_restarts: bool = True) -> redis.Redis:
    """A client for toolq's keys. Refused connections (a restart) are retried for a few
    seconds (about 9 s in all) unless ``ride_out_restarts`` is False (operator commands:
    one line at once); a timeout (a hung Redis) is not: it already took
    ``redis_socket_timeout``, and callers must fail fast."""
    timeout = settings.redis_socket_timeout_s
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "health_check_interval": 25,
        "retry": Retry(
            ExponentialBackoff(cap=2.0, base=0.05),
            retries=8 if ride_out_restarts else 0,
            supported_errors=(redis.ConnectionError,),
        ),
        "retry_on_error": [redis.ConnectionError],
    }
    if settings.redis_url.startswith("sentinel://"):
        master: redis.Redis = _sentinel_master(settings, Sentinel, options)
        return master
    return redis.Redis.from_url(settings.redis_url, **options)


def async_redis_client(settings: Settings, *, retries: int = 1) -> aioredis.Redis:
    """A ``redis.asyncio`` client (the asyncio producer's) with the sync client's
    timeouts (and Sentinel). A broken pooled connection (Redis restarted) is tried again
    ``retries`` times at once; longer outages are the caller's to ride out (it knows its
    deadline)."""
    timeout = settings.redis_socket_timeout_s
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": AsyncRetry(NoBackoff(), retries=retries),
        "retry_on_error": [redis.ConnectionError],
    }
    if settings.redis_url.startswith("sentinel://"):
        master: aioredis.Redis = _sentinel_master(settings, AsyncSentinel, options)
        return master
    return aioredis.Redis.from_url(settings.redis_url, **options)


def _sentinel_master(settings: Settings, sentinel_class: Any, options: dict[str, Any]) -> Any:
    """The master the URL's sentinels name, as a client (sync or asyncio) with ``options``."""
    assert settings.redis_sentinel_master is not None  # checked by Settings
    timeout = settings.redis_socket_timeout_s
    sentinels, db, password = parse_sentinel_url(settings.redis_url)
    sentinel = sentinel_class(sentinels, socket_connect_timeout=timeout, socket_timeout=timeout)
    return sentinel.master_for(settings.redis_sentinel_master, db=db, password=password, **options)


def close_redis(client: redis.Redis) -> None:
    """Close a client and every connection behind it: its pool and, for a Sentinel master,
    the connections to the sentinels that named it (``close()`` leaves those open)."""
    pool = client.connection_pool
    client.close()
    pool.disconnect()
    manager: Any = getattr(pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], int, str | None]:
    """Celery's form: ``sentinel://[:pw@]h1:26379;sentinel://h2:26379/0`` -> hosts, db, password."""
    hosts: list[tuple[str, int]] = []
    db, password = 0, None
    for part in url.split(";"):
        parsed = urlsplit(part.strip())
        if parsed.hostname:
            hosts.append((parsed.hostname, parsed.port or 26379))
        if parsed.password:
            password = parsed.password
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
    return hosts, db, password


def redis_endpoints(settings: Settings) -> list[tuple[str, int]]:
    """Every (host, port) of the worker's Redis: the server, or the sentinels with the
    master and replicas they name now (asked once, best effort). A tool never reaches
    these, whatever its `--allow-net` grant (the egress proxy refuses them)."""
    url = settings.redis_url
    if url.startswith("unix://"):
        return []
    if not url.startswith("sentinel://"):
        parsed = urlsplit(url)
        return [(parsed.hostname or "localhost", parsed.port or 6379)]
    sentinels, _db, _password = parse_sentinel_url(url)
    endpoints = list(sentinels)
    timeout = settings.redis_socket_timeout_s
    sentinel: Any = Sentinel(sentinels, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        master = settings.redis_sentinel_master
        endpoints.append(sentinel.discover_master(master))
        endpoints.extend(sentinel.discover_slaves(master))
    except redis.RedisError:
        pass
    finally:
        for client in sentinel.sentinels:
            client.close()
    return [(str(host), int(port)) for host, port in endpoints]
