"""`toolq flower`: Flower on toolq's Celery app, answering only under the host names it is
served as.

Its command line is built here (:func:`command_line`), with the password from a secret
file (:func:`read_basic_auth`) and a refusal to listen beyond this host without one
(:func:`exposure_problem`).

A Flower on 127.0.0.1 without a password is open to DNS rebinding: a page the operator
opens elsewhere points its own name at 127.0.0.1 and drives Flower's API (revoke calls,
shut workers down) from the operator's browser. The browser still sends the page's own
name as ``Host``: Flower refuses any name it was not told to answer (403).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolq.config.settings import Settings

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


def read_basic_auth(path: Path) -> str:
    """``--basic-auth-file``: one ``user:password`` per line, as Flower's comma-separated
    ``--basic_auth`` (OSError when the file cannot be read)."""
    return ",".join(line for line in path.read_text().split() if line)


def exposure_problem(address: str, basic_auth: str | None) -> str | None:
    """Why Flower must not start this way (listening beyond this host with no password),
    or None."""
    if address not in LOCAL_ADDRESSES and not basic_auth:
        return "Flower on a non-local address needs --basic-auth-file (or --basic-auth)"
    return None


def command_line(*, port: int, address: str, max_tasks: int, basic_auth: str | None) -> list[str]:
    """Flower's argv (Celery's ``flower`` sub-command): offline workers purged after 10
    minutes, at most ``max_tasks`` finished calls kept in memory."""
    argv = [
        "flower",
        f"--port={port}",
        f"--address={address}",
        f"--max_tasks={max_tasks}",
        "--purge_offline_workers=600",
    ]
    if basic_auth:
        argv.append(f"--basic_auth={basic_auth}")
    return argv


def serve(settings: Settings, argv: list[str], warn: Callable[[str], None]) -> None:
    """Run Flower (``argv`` from :func:`command_line`) on toolq's Celery app until stopped."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    from toolq.config.celery_app import make_celery

    app = make_celery(settings)
    # Workers send task events on demand (performance.task_events): ask now, so calls
    # show from the first second; Flower itself asks again every 5 s (so a Redis that is
    # not up yet only delays this).
    try:
        app.control.enable_events()
    except (OperationalError, RedisError, OSError) as exc:
        warn(f"toolq: cannot ask workers for task events yet ({exc})")
    app.start(argv)


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
