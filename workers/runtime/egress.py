"""The egress proxy: a sandboxed tool's only way onto the network (`--allow-net`).

A sandbox granted `--allow-net` has no network of its own (only its loopback). Its one
way out is a unix socket of this proxy, bound into it read-only; the wrapper relays
``127.0.0.1:<port>`` inside the sandbox to that socket and sets ``HTTP_PROXY`` and
``HTTPS_PROXY`` for Bun, so ``fetch`` goes through here. The proxy speaks HTTP/1.1
forward proxying: ``CONNECT host:port`` (HTTPS, any TLS or TCP stream) and absolute-URI
``http://`` requests.

What it decides, for every connection (:class:`Destinations`):
- **Scoped** (``--allow-net=HOSTS``): the host and port *as the tool asked for them* must
  match a rule; **unscoped** (``--allow-net``): any host and port — the public network.
- Then the name is resolved *here* and every address is checked before one is connected
  to (the address checked is the address used: no rebinding between check and connect).
  Never reached, whatever the rules: the worker's Redis and Sentinel endpoints.
  Reached only through a rule that names the address and the port
  (``--allow-net=10.0.0.5:8080``, ``localhost:3000``): loopback, unspecified, link-local
  (cloud metadata at 169.254.169.254 and fd00:ec2::254), private (RFC 1918), shared
  (RFC 6598, CGNAT), unique-local, multicast, reserved and broadcast addresses, in every
  spelling (IPv4-mapped, -compatible, NAT64, 6to4, Teredo), and every address of this
  host's own interfaces (the worker's ports, whatever it binds).

Who may connect: only a process this worker launched (the peer's pid, from
``SO_PEERCRED``, must be one of the launched processes or below one), at most
:data:`MAX_TUNNELS_PER_PROCESS` connections each; :meth:`Peers.end_call` closes what a
call left open when it ends, so one call cannot starve the next.

What it does not do: UDP (a sandbox has no route for it), DNS for the tool (names are
resolved here).

Over 400 lines on purpose: the address policy (:class:`Destinations`) and the proxy that
applies it are one security boundary, reviewed together; the policy is the first half.
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
import struct
import tempfile
import threading
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from toolq.permissions import NetRule

log = logging.getLogger("toolq.worker")

MAX_HEAD_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0
MAX_CONNECTIONS = 256
"""Open connections per proxy: a worker's threads are bounded whatever its tools do."""
MAX_TUNNELS_PER_PROCESS = 32
"""Open connections per launched Bun process (one call at a time): one call's leftovers
cannot starve the other processes sharing a proxy."""
SOCKET_NAME = "egress.sock"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_INTERNAL: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared (RFC 6598, carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "unique-local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
_INTERNAL_NETS = tuple((ipaddress.ip_network(net), why) for net, why in _INTERNAL)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address also reaches (mapped, compatible, NAT64, 6to4,
    Teredo): each is checked as if it had been asked for itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    found = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    packed = address.packed
    if packed[:12] == bytes(12) and packed[12:] != bytes(4):  # ::a.b.c.d (compatible)
        found.append(ipaddress.IPv4Address(packed[12:]))
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(packed[12:]))
    return found


def internal_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not on the public network (None if it is)."""
    for candidate in (address, *embedded_ipv4(address)):
        for network, why in _INTERNAL_NETS:
            if candidate.version == network.version and candidate in network:
                return why
        if candidate == ipaddress.IPv4Address("255.255.255.255"):
            return "broadcast"
    return None


def is_own_address(address: IPAddress) -> bool:
    """Whether ``address`` is one of this host's own (any interface, now): only those can
    be bound to. Exact and current, one syscall; with ``ip_nonlocal_bind`` set every
    address looks local, which refuses more, never less."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    return True


def _plain(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Destinations:
    """Which addresses a tool may reach (the module docstring says the rules).

    ``protected``: (host, port) endpoints no tool reaches, whatever its rules — the
    worker's Redis and Sentinels, resolved once here.
    """

    def __init__(self, protected: Iterable[tuple[str, int]] = ()) -> None:
        self.protected: set[tuple[IPAddress, int]] = set()
        for host, port in protected:
            for address in _resolve(host, port):
                self.protected.add((_plain(address), port))

    def refusal(self, address: IPAddress, port: int, rules: Sequence[NetRule] | None) -> str | None:
        """None if a tool with ``rules`` (None: unscoped) may connect to address:port."""
        address = _plain(address)
        shown = _show(str(address), port)
        if any(
            (candidate, port) in self.protected for candidate in (address, *embedded_ipv4(address))
        ):
            return f"{shown} is the worker's Redis: never reachable from a tool"
        why = internal_reason(address)
        if why is None and is_own_address(address):
            why = "an address of the worker's own host"
        if why is None:
            return None
        if rules is not None and any(rule.names_address(address, port) for rule in rules):
            return None
        return (
            f"{shown} is {why}: reachable only through a rule naming the address and "
            f"port (--allow-net={shown})"
        )

    def connect(self, host: str, port: int, rules: Sequence[NetRule] | None) -> socket.socket:
        """A socket connected to the first address of ``host`` a tool may reach.

        Raises :class:`Refused` when no address may be reached, OSError when none answered.
        """
        try:
            addresses = _resolve(host, port)
        except OSError as exc:
            raise OSError(f"cannot resolve {host}: {exc}") from exc
        refusals: list[str] = []
        error: OSError | None = None
        for address in addresses:
            refusal = self.refusal(address, port, rules)
            if refusal is not None:
                refusals.append(refusal)
                continue
            try:
                return socket.create_connection((str(address), port), timeout=CONNECT_TIMEOUT_S)
            except OSError as exc:
                error = error or OSError(f"cannot connect to {_show(str(address), port)}: {exc}")
        if error is not None:
            raise error
        if not refusals:
            raise OSError(f"cannot resolve {host}: no address")
        raise Refused(refusals[0] if _literal(host) else f"{host} resolves to {refusals[0]}")


class Refused(Exception):
    """A destination the rules do not let a tool reach (the proxy answers 403)."""


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int) -> list[IPAddress]:
    host = host.strip("[]").rstrip(".")
    if _literal(host):
        return [ipaddress.ip_address(host)]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in seen:
            seen.append(address)
    return seen


class Peers:
    """The processes a worker launched, which alone may use its egress proxies, and the
    connections each holds open (bounded; closed when its call ends)."""

    def __init__(self, per_process: int = MAX_TUNNELS_PER_PROCESS) -> None:
        self.per_process = per_process
        self._open: dict[int, set[socket.socket]] = {}
        self._lock = threading.Lock()

    def add(self, pid: int) -> None:
        with self._lock:
            self._open.setdefault(pid, set())

    def remove(self, pid: int) -> None:
        self.end_call(pid)
        with self._lock:
            self._open.pop(pid, None)

    def end_call(self, pid: int) -> None:
        """Close every connection ``pid`` still holds (its call is over)."""
        with self._lock:
            held = list(self._open.get(pid, ()))
        for conn in held:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def owner(self, peer_pid: int) -> int | None:
        """The launched process ``peer_pid`` is (or runs below), None for a stranger."""
        pid = peer_pid
        for _ in range(6):  # bwrap, its pid-1 child, Bun, a child of Bun's
            with self._lock:
                if pid in self._open:
                    return pid
            pid = _parent(pid)
            if pid <= 1:
                return None
        return None

    def hold(self, owner: int, conn: socket.socket) -> bool:
        with self._lock:
            held = self._open.get(owner)
            if held is None or len(held) >= self.per_process:
                return False
            held.add(conn)
            return True

    def release(self, owner: int, conn: socket.socket) -> None:
        with self._lock:
            self._open.get(owner, set()).discard(conn)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _peer_pid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


class EgressProxy:
    """One listening unix socket (in a directory of its own) for one set of rules
    (``rules`` None: unscoped `--allow-net`, the public network)."""

    def __init__(
        self,
        rules: Sequence[NetRule] | None,
        destinations: Destinations | None = None,
        peers: Peers | None = None,
    ) -> None:
        self.rules = None if rules is None else tuple(rules)
        self.destinations = destinations or Destinations()
        self.peers = peers
        """None: any local process may connect (tests of the proxy alone)."""
        self.pid = os.getpid()
        """A forked child must not serve or remove its parent's proxy (see Launcher)."""
        # Named like the per-call temp dirs, so a dead worker's socket dir is swept too.
        self.directory = tempfile.mkdtemp(prefix=f"toolq-call-{os.getpid()}-egress-")
        os.chmod(self.directory, 0o755)
        self.path = os.path.join(self.directory, SOCKET_NAME)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        # The tools' uid (65534) connects to it; who may use it is checked per connection
        # (SO_PEERCRED), so the mode grants a local stranger nothing.
        os.chmod(self.path, 0o666)
        self._listener.listen(128)
        self._closed = False
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        threading.Thread(target=self._serve, name="toolq-egress", daemon=True).start()
        atexit.register(self.close)

    def describe_rules(self) -> str:
        return "" if self.rules is None else ",".join(str(rule) for rule in self.rules)

    def allowed(self, host: str, port: int) -> bool:
        """Whether the host and port as asked are in the rules (unscoped: always)."""
        if self.rules is None:
            return True
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
            owner = self._admit(conn)
            if owner is None:
                continue
            if not self._slots.acquire(blocking=False):
                self._release(owner, conn)
                with conn, contextlib.suppress(OSError):
                    _reply(conn, 503, f"toolq: more than {MAX_CONNECTIONS} open connections")
                continue
            threading.Thread(
                target=self._handle, args=(conn, owner), name="toolq-egress-conn", daemon=True
            ).start()

    def _admit(self, conn: socket.socket) -> int | None:
        """The launched process this connection comes from (0 without peer checks), or
        None after refusing it."""
        if self.peers is None:
            return 0
        try:
            peer = _peer_pid(conn)
        except OSError:
            peer = 0
        owner = self.peers.owner(peer) if peer > 0 else None
        if owner is None:
            log.warning("egress proxy: refused a connection from pid %s (not a tool)", peer)
            with conn, contextlib.suppress(OSError):
                _reply(conn, 403, "toolq: not a process of this worker")
            return None
        if not self.peers.hold(owner, conn):
            with conn, contextlib.suppress(OSError):
                _reply(
                    conn,
                    503,
                    f"toolq: more than {self.peers.per_process} open connections in this call",
                )
            return None
        return owner

    def _release(self, owner: int, conn: socket.socket) -> None:
        if self.peers is not None:
            self.peers.release(owner, conn)

    def _handle(self, conn: socket.socket, owner: int) -> None:
        try:
            with conn:
                self._proxy(conn)
        except (OSError, ValueError) as exc:
            log.debug("egress connection ended: %s", exc)
        finally:
            self._release(owner, conn)
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
            upstream = self.destinations.connect(host, port, self.rules)
        except Refused as exc:
            _reply(conn, 403, f"toolq: {exc}")
            return
        except OSError as exc:
            _reply(conn, 502, f"toolq: {exc}")
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
