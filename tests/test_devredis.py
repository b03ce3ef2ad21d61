"""The development Redis helpers against a real Redis: a run that writes thousands of
results (the test suite, ``toolq bench``) gets an empty database of its own and leaves
it empty."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis

from toolq.cli.devredis import scratch_database


def test_a_scratch_database_is_one_nobody_uses_and_is_emptied_after(redis_url: str) -> None:
    server = urlsplit(redis_url)._replace(path="/0").geturl()
    with scratch_database(server, "check") as url:
        assert urlsplit(url).path not in ("/0", urlsplit(redis_url).path)  # not one in use
        client = redis.Redis.from_url(url)
        (marker,) = client.keys()
        assert marker.decode().startswith("toolq-check:")
        client.set("left", "behind")
    assert client.dbsize() == 0
    client.close()
