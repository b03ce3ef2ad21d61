"""Flower answers only under the host names it is served as.

A Flower on 127.0.0.1 without a password is open to DNS rebinding: a page the operator
opens elsewhere points its own name at 127.0.0.1 and drives Flower's API (revoke calls,
shut workers down) from the operator's browser. The browser still sends the page's own
name as ``Host``: Flower refuses any name it was not told to answer (403).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def allowed_hosts(address: str, extra: Iterable[str]) -> frozenset[str]:
    """Local names, the listen address (unless a wildcard), this host's name, and
    ``extra`` (``--allowed-host``: the name a proxy or an ingress serves Flower as)."""
    names = set(LOCAL_NAMES) | {name.strip().lower().strip("[]") for name in extra}
    if address not in ("0.0.0.0", "::", ""):
        names.add(address.lower().strip("[]"))
    names.add(socket.gethostname().lower())
    return frozenset(names)


def restrict_hosts(allowed: frozenset[str]) -> None:
    """Make Flower's tornado application refuse requests for any other ``Host``."""
    from flower.app import Flower
    from tornado.web import ErrorHandler

    answer = Flower.find_handler

    def find_handler(self: Any, request: Any, **kwargs: Any) -> Any:
        if request.host_name.lower().strip("[]") not in allowed:
            return self.get_handler_delegate(request, ErrorHandler, {"status_code": 403})
        return answer(self, request, **kwargs)

    Flower.find_handler = find_handler
