"""The egress proxy's decisions (workers/runtime/egress.py), without a sandbox: names that
resolve inside, rules that name an address and port, every spelling of an address."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from toolq.permissions import parse_net_rule
from toolq.workers.runtime import egress
from toolq.workers.runtime.egress import Destinations, Refused


def _resolving(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(egress.socket, "getaddrinfo", getaddrinfo)


def test_a_name_resolving_inside_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS answers are checked, not only what the tool asked for (rebinding, a public name
    pointed at metadata): the refusal names the rule that would allow it."""
    _resolving(monkeypatch, {"db.example.com": ["10.0.0.5"], "meta.example": ["169.254.169.254"]})
    destinations = Destinations()
    with pytest.raises(Refused, match=r"db.example.com resolves to 10.0.0.5:5432 is private"):
        destinations.connect("db.example.com", 5432, None)
    with pytest.raises(Refused, match=r"--allow-net=10.0.0.5:5432"):
        destinations.connect("db.example.com", 5432, [parse_net_rule("db.example.com")])
    with pytest.raises(Refused, match="link-local"):
        destinations.connect("meta.example", 80, None)


def test_only_a_rule_naming_address_and_port_opens_an_internal_address() -> None:
    destinations = Destinations()
    address = ipaddress.ip_address("10.0.0.5")
    assert destinations.refusal(address, 8080, None) is not None
    for text in ("10.0.0.5", "10.0.0.5:9090", "*.example.com", "db.internal:8080"):
        assert destinations.refusal(address, 8080, [parse_net_rule(text)]) is not None, text
    assert destinations.refusal(address, 8080, [parse_net_rule("10.0.0.5:8080")]) is None
    loopback = ipaddress.ip_address("127.0.0.1")
    assert destinations.refusal(loopback, 3000, [parse_net_rule("localhost:3000")]) is None
    assert destinations.refusal(loopback, 3000, [parse_net_rule("localhost")]) is not None


def test_the_workers_redis_is_refused_even_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    destinations = Destinations([("127.0.0.1", 6379)])
    redis = ipaddress.ip_address("127.0.0.1")
    assert "Redis" in str(destinations.refusal(redis, 6379, [parse_net_rule("127.0.0.1:6379")]))
    mapped = ipaddress.ip_address("::ffff:127.0.0.1")
    assert "Redis" in str(destinations.refusal(mapped, 6379, None))
    assert destinations.refusal(redis, 6380, [parse_net_rule("127.0.0.1:6380")]) is None


def test_a_public_address_is_reached_and_the_hosts_own_are_not() -> None:
    destinations = Destinations()
    assert destinations.refusal(ipaddress.ip_address("203.0.113.7"), 443, None) is None
    own = ipaddress.ip_address("127.0.0.1")
    assert egress.is_own_address(own)
    assert not egress.is_own_address(ipaddress.ip_address("203.0.113.7"))


def test_a_redis_password_in_the_project_file_is_called_out(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Tools may read the project directory: a password written there is theirs."""
    from toolq.config.loader import load_settings
    from toolq.workers.assembly import _warn_if_project_holds_redis_password

    project = tmp_path / "compozy.yaml"
    project.write_text("name: p\nredis_url: redis://:s3cret@redis.internal:6379/0\n")
    with caplog.at_level("WARNING", logger="toolq.worker"):
        _warn_if_project_holds_redis_password(load_settings(project, environ={}))
    assert "holds the Redis password" in caplog.text and "s3cret" not in caplog.text
    caplog.clear()
    environ = {"TOOLQ_REDIS_URL": "redis://:s3cret@redis.internal:6379/0"}
    project.write_text("name: p\n")
    with caplog.at_level("WARNING", logger="toolq.worker"):
        _warn_if_project_holds_redis_password(load_settings(project, environ=environ))
    assert caplog.text == ""
