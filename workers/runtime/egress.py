"""The egress proxy that enforces a scoped `--allow-net=HOSTS`.

A sandbox with a scoped grant has no network of its own (only its loopback). Its one
way out is a unix socket of this proxy, bound into it read-only; the wrapper relays
``127.0.0.1:<port>`` inside the sandbox to that socket and sets ``HTTP_PROXY`` and
``HTTPS_PROXY`` for Bun, so ``fetch`` goes through here. The proxy speaks HTTP/1.1
forward proxying: ``CONNECT host:port`` (HTTPS, any TLS or TCP stream) and absolute-URI
``http://`` requests. It checks the host and port *as the tool asked for them*
against the rules before it resolves or connects anything; a refusal is a ``403``
whose body (for plain HTTP) and reason phrase say which grant it is not in.

What it does not do: UDP, raw TCP without CONNECT, DNS for the tool (names are
resolved here, for allowed hosts only). An allowed name is trusted to resolve where it
should: a rule for ``api.example.com`` allows whatever address that name resolves to
from the worker.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import select
import shutil
import socket
import tempfile
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

from toolq.permissions import NetRule

log = logging.getLogger("toolq.worker")

MAX_HEAD_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0
MAX_CONNECTIONS = 64
"""Open connections per proxy: a tool cannot spend the worker's threads without bound."""
SOCKET_NAME = "egress.sock"


class EgressProxy:
    """One listening unix socket (in a directory of its own) for one set of rules."""

    def __init__(self, rules: Sequence[NetRule]) -> None:
        self.rules = tuple(rules)
        self.pid = os.getpid()
        """A forked child must not serve or remove its parent's proxy (see Launcher)."""
        # Named like the per-call temp dirs, so a dead worker's socket dir is swept too.
        self.directory = tempfile.mkdtemp(prefix=f"toolq-call-{os.getpid()}-egress-")
        os.chmod(self.directory, 0o755)
        self.path = os.path.join(self.directory, SOCKET_NAME)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        os.chmod(self.path, 0o666)  # the tool's uid (65534) connects to it
        self._listener.listen(128)
        self._closed = False
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        threading.Thread(target=self._serve, name="toolq-egress", daemon=True).start()
        atexit.register(self.close)

    def describe_rules(self) -> str:
        return ",".join(str(rule) for rule in self.rules)

    def allowed(self, host: str, port: int) -> bool:
        host = _canonical_host(host)
        return any(rule.matches(host, port) for rule in self.rules)

    def close(self) -> None:
        if self._closed or os.getpid() != self.pid:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                with conn, contextlib.suppress(OSError):
                    _reply(conn, 503, f"toolq: more than {MAX_CONNECTIONS} open connections")
                continue
            threading.Thread(
                target=self._handle, args=(conn,), name="toolq-egress-conn", daemon=True
            ).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._proxy(conn)
        except (OSError, ValueError) as exc:
            log.debug("egress connection ended: %s", exc)
        finally:
            self._slots.release()

    def _proxy(self, conn: socket.socket) -> None:
        conn.settimeout(CONNECT_TIMEOUT_S)
        head = bytearray()
        while b"\r\n\r\n" not in head:
            data = conn.recv(65536)
            if not data:
                return
            head += data
            if len(head) > MAX_HEAD_BYTES:
                _reply(conn, 431, "request head too large")
                return
        end = head.index(b"\r\n\r\n") + 4
        rest = bytes(head[end:])
        lines = bytes(head[:end]).decode("latin-1").split("\r\n")
        method, target, version = [*lines[0].split(" "), "", "", ""][:3]
        if method.upper() == "CONNECT":
            host, port = _split_host_port(target, default_port=443)
            forward = b""
        else:
            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                _reply(conn, 400, f"toolq: only http:// URLs or CONNECT, not {target!r}")
                return
            host, port = url.hostname, url.port or 80
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            headers = [
                line
                for line in lines[1:]
                if line
                and not line.lower().startswith(("proxy-connection:", "proxy-authorization:"))
            ]
            forward = (f"{method} {path} {version}\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode(
                "latin-1"
            )
        if not self.allowed(host, port):
            _reply(
                conn,
                403,
                f"toolq: {_show(host, port)} not in --allow-net={self.describe_rules()}",
            )
            return
        try:
            upstream = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            _reply(conn, 502, f"toolq: cannot connect to {_show(host, port)}: {exc}")
            return
        with upstream:
            if forward:
                upstream.sendall(forward)
            else:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.sendall(rest)
            _relay(conn, upstream)


def _canonical_host(host: str) -> str:
    host = host.strip("[]").lower().rstrip(".")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    return host


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host_port(target: str, default_port: int) -> tuple[str, int]:
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = target.rpartition(":") if ":" in target else (target, "", "")
    if port_text and not port_text.isdigit():
        raise ValueError(f"bad CONNECT target {target!r}")
    return host, int(port_text) if port_text else default_port


def _reply(conn: socket.socket, status: int, message: str) -> None:
    """An error response; the reason phrase carries the message too (Bun reports it for a
    refused CONNECT, where a body is never read)."""
    reason = message.replace("\r", " ").replace("\n", " ")
    body = (message + "\n").encode()
    conn.sendall(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"X-Toolq-Denied: {reason}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode("latin-1", errors="replace")
        + body
    )


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both sides have finished (half-closes are passed on)."""
    a.setblocking(True)
    b.setblocking(True)
    peers = {a: b, b: a}
    open_ = {a, b}
    while open_:
        ready, _, _ = select.select(list(open_), [], [], IDLE_TIMEOUT_S)
        if not ready:
            return
        for sock in ready:
            data = sock.recv(65536)
            if data:
                peers[sock].sendall(data)
                continue
            open_.discard(sock)
            with contextlib.suppress(OSError):
                peers[sock].shutdown(socket.SHUT_WR)
