"""Compozy's (Deno's) `--allow-*` flags parsed into what toolq enforces.

Producers (config load) and workers read the same parse, so a form toolq cannot
enforce is refused where the configuration is read, naming the flag — never ignored,
never widened. Enforcement is in :mod:`toolq.workers.sandbox`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

Grant = bool | tuple[str, ...]
"""False: not granted; True: granted whole; a tuple: only those names."""

KNOWN = (
    "--allow-read",
    "--allow-write",
    "--allow-net",
    "--allow-env",
    "--allow-run",
    "--allow-sys",
    "--allow-ffi",
    "--allow-hrtime",
    "--allow-all",
    "-A",
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_PROGRAM = re.compile(r"^[A-Za-z0-9_.+/-]+$")


@dataclass(frozen=True)
class NetRule:
    """One `--allow-net` entry: a host (or `*.suffix`) and an optional port."""

    host: str
    port: int | None = None
    wildcard: bool = False

    def matches(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        if self.port is not None and port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def names_address(
        self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
    ) -> bool:
        """Whether this rule names ``address`` and ``port`` explicitly (``10.0.0.5:8080``,
        ``[::1]:3000``, ``localhost:3000`` for loopback): the one way a tool reaches a
        loopback, private or link-local address (see the egress proxy)."""
        if self.port != port or self.wildcard:
            return False
        if self.host == "localhost":
            return address.is_loopback
        try:
            return ipaddress.ip_address(self.host) == address
        except ValueError:
            return False

    def __str__(self) -> str:
        host = f"*.{self.host}" if self.wildcard else self.host
        if ":" in host:
            host = f"[{host}]"
        return host if self.port is None else f"{host}:{self.port}"


def parse_net_rule(text: str) -> NetRule:
    """``api.example.com``, ``host:8080``, ``10.0.0.1``, ``[::1]:443``, ``*.example.com``."""
    try:
        return _parse_net_rule(text)
    except ValueError as exc:
        message = str(exc)
        if "cannot enforce" not in message:
            message = f"--allow-net entry {text!r}: {message} (toolq cannot enforce other forms)"
        raise ValueError(message) from None


def _parse_net_rule(text: str) -> NetRule:
    value = text.strip().lower()
    port: int | None = None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"--allow-net entry {text!r}: expected [IPv6]:port")
            port = _port(text, rest[1:])
        ipaddress.IPv6Address(host)
        return NetRule(host, port)
    if value.count(":") == 1:
        value, _, port_text = value.partition(":")
        port = _port(text, port_text)
    elif value.count(":") > 1:
        ipaddress.IPv6Address(value)  # a bare IPv6 address, no port
        return NetRule(value)
    wildcard = value.startswith("*.")
    host = value[2:] if wildcard else value
    try:
        ipaddress.IPv4Address(host)
        if wildcard:
            raise ValueError(f"--allow-net entry {text!r}: a wildcard needs a domain")
        return NetRule(host, port)
    except ipaddress.AddressValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or "*" in host or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(
            f"--allow-net entry {text!r} is not a host, host:port, IP or *.domain "
            "(toolq cannot enforce other forms)"
        )
    if wildcard and len(labels) < 2:
        raise ValueError(f"--allow-net entry {text!r}: a wildcard must name a domain (*.a.b)")
    return NetRule(host.rstrip("."), port, wildcard)


def _port(text: str, port_text: str) -> int:
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--allow-net entry {text!r}: bad port {port_text!r}")
    return int(port_text)


@dataclass(frozen=True)
class Permissions:
    """Parsed `--allow-*` flags (docs/security/sandbox.md, the permissions table)."""

    read: Grant = False
    write: Grant = False
    net: Grant = False
    env: Grant = False
    run: Grant = False
    sys: bool = False
    ffi: bool = False
    hrtime: bool = False

    @property
    def net_rules(self) -> tuple[NetRule, ...]:
        return (
            tuple(parse_net_rule(entry) for entry in self.net)
            if isinstance(self.net, tuple)
            else ()
        )

    @classmethod
    def parse(cls, flags: list[str]) -> Permissions:
        """Parse flags; ValueError naming the flag for any form toolq cannot enforce."""
        grants: dict[str, Grant] = {}
        for flag in flags:
            name, has_value, value = flag.partition("=")
            if name not in KNOWN:
                raise ValueError(f"unknown permission {flag!r}; known: {', '.join(KNOWN)}")
            if name in ("--allow-all", "-A"):
                if has_value:
                    raise ValueError(f"permission {flag!r}: --allow-all takes no value")
                return cls(True, True, True, True, True, True, True, True)
            key = name.removeprefix("--allow-")
            if not has_value:
                grants[key] = True
                continue
            items = tuple(item.strip() for item in value.split(",") if item.strip())
            if not items:
                raise ValueError(f"permission {flag!r}: empty list (omit '=' to grant all)")
            if key in ("sys", "ffi", "hrtime"):
                raise ValueError(
                    f"permission {flag!r}: toolq cannot enforce a scoped --allow-{key}; "
                    f"grant --allow-{key} whole or not at all"
                )
            if key == "env":
                bad = [item for item in items if not _ENV_NAME.match(item)]
                if bad:
                    raise ValueError(f"permission {flag!r}: not variable names: {bad}")
            if key == "net":
                for item in items:
                    parse_net_rule(item)
            if key == "run":
                bad = [item for item in items if not _PROGRAM.match(item) or ".." in item]
                if bad:
                    raise ValueError(f"permission {flag!r}: not program names or paths: {bad}")
            if key in ("read", "write"):
                bad = [item for item in items if not item.startswith("/")]
                if bad:
                    raise ValueError(f"permission {flag!r}: paths must be absolute: {bad}")
            previous = grants.get(key)
            if previous is True:
                continue
            grants[key] = tuple(previous or ()) + items
        permissions = cls(**grants)  # type: ignore[arg-type]
        if isinstance(permissions.run, tuple) and permissions.read is True:
            raise ValueError(
                "permission --allow-run=PROGRAMS with the whole filesystem readable "
                "(--allow-read) cannot be enforced: every program on the host would be "
                "reachable; grant --allow-read=PATHS or --allow-run"
            )
        return permissions
