"""`--allow-net` is the public network, never the control plane (docs/security/network.md).

A tool granted unscoped `--allow-net` (Compozy's examples grant it to any tool that calls an
API) reached the worker's own Redis on loopback and so every project's calls. Now every
sandbox with a network grant has no network of its own; its one way out is the worker's
egress proxy, which refuses loopback, private, link-local and the host's own addresses
(unless a rule names the address and port) and the worker's Redis (always).

Nothing outside this machine is contacted: internal targets are refused before any
connection, and the "public" host is a server in a network namespace the test makes
(an address from TEST-NET-3, which the proxy treats as public like any routed address).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import StartWorker, wait_until
from toolq.config.settings import TimeLimits
from toolq.permissions import Permissions
from toolq.producers.client import ToolClient
from toolq.workers.runtime.base import Call
from toolq.workers.runtime.bun import WRAPPER
from toolq.workers.runtime.egress import Destinations, internal_reason
from toolq.workers.runtime.launch import Launcher
from toolq.workers.runtime.limits import Cgroups
from toolq.workers.runtime.sandbox import make_sandbox
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime

PROJECT = Path(__file__).resolve().parent / "projects" / "netprobe"
CONFIG = PROJECT / "compozy.yaml"


def _redis_endpoint(redis_url: str) -> tuple[str, int]:
    parsed = urlsplit(redis_url)
    return parsed.hostname or "127.0.0.1", parsed.port or 6379


@pytest.fixture(scope="module")
def launcher(bun: Path, redis_url: str) -> Launcher:
    sandbox = make_sandbox("required", bun, WRAPPER, PROJECT)
    return Launcher(
        bun,
        PROJECT / "entrypoint.ts",
        PROJECT,
        sandbox=sandbox,
        cgroups=Cgroups.detect(),
        destinations=Destinations([_redis_endpoint(redis_url)]),
    )


def call(launcher: Launcher, mode: str, tool: str, payload: Any, flags: list[str]) -> Any:
    request = Call(
        tool, "net-test", payload, {}, TimeLimits(20, 25), permissions=Permissions.parse(flags)
    )
    if mode == "spawn":
        outcome = SpawnRuntime(launcher).run(request)
    else:
        pool = WarmRuntime(
            launcher, 1, max_calls_per_process=10, max_rss_mb=1024, permissions=request.permissions
        )
        try:
            outcome = pool.run(request)
        finally:
            pool.close()
    assert outcome.result is not None, (outcome.error, outcome.stderr[-2000:])
    return outcome.result


class _Counting(http.server.BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _Server6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture
def loopback() -> Iterator[tuple[int, list[str]]]:
    """One port on 127.0.0.1 and ::1 that counts every request it gets."""
    hits: list[str] = []
    handler = type("Handler", (_Counting,), {"hits": hits})
    v4 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = v4.server_address[1]
    servers: list[http.server.HTTPServer] = [v4]
    with contextlib.suppress(OSError):
        servers.append(_Server6(("::1", port), handler))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port, hits
    for server in servers:
        server.shutdown()
        server.server_close()


def _refused(answer: dict[str, Any]) -> bool:
    """A fetch the egress proxy refused: its 403 (or, for HTTPS, the failed tunnel)."""
    if answer.get("status") == 403 and "toolq:" in str(answer.get("body")):
        return True
    return not answer["ok"] and "403" in str(answer.get("error"))


LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "localhost",
    "[::1]",
    "0.0.0.0",
    "2130706433",
    "0x7f000001",
    "127.1",
    "127.0.0.2",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
]


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_unscoped_net_reaches_no_spelling_of_loopback(
    launcher: Launcher, loopback: tuple[int, list[str]], mode: str
) -> None:
    """Every spelling of this host reached the worker's loopback services (and Redis)."""
    port, hits = loopback
    urls = [f"http://{host}:{port}/x" for host in LOOPBACK_SPELLINGS]
    answers = call(launcher, mode, "fetch_all", {"urls": urls}, ["--allow-net"])["answers"]
    for url, answer in zip(urls, answers, strict=True):
        assert _refused(answer), (url, answer)
    assert (
        "loopback" in answers[0]["body"] and f"--allow-net=127.0.0.1:{port}" in answers[0]["body"]
    )
    assert "localhost resolves to" in answers[1]["body"]
    # raw TCP and UDP have no route at all: the sandbox has only a loopback of its own
    for host in ("127.0.0.1", "::1"):
        routes = call(launcher, mode, "every_route", {"host": host, "port": port}, ["--allow-net"])
        assert _refused(routes["fetch"]) and _refused(routes["fetch_https"]), routes
        for raw in ("connect", "node_net", "udp"):
            assert not routes[raw]["ok"], (host, raw, routes[raw])
    assert hits == []


def test_unscoped_net_refuses_private_link_local_and_metadata(launcher: Launcher) -> None:
    """Refused before any connection is attempted: nothing leaves this machine."""
    targets = {
        "169.254.169.254": "link-local",
        "[fd00:ec2::254]": "unique-local",
        "10.0.0.1": "RFC 1918",
        "172.16.0.1": "RFC 1918",
        "192.168.1.1": "RFC 1918",
        "100.100.100.200": "carrier-grade NAT",
        "[fe80::1]": "link-local",
        "[64:ff9b::a9fe:a9fe]": "link-local",  # NAT64 of 169.254.169.254
        "[2002:a9fe:a9fe::1]": "link-local",  # 6to4 of it
        "[::ffff:10.0.0.1]": "RFC 1918",
        "224.0.0.1": "multicast",
    }
    urls = [f"http://{host}/latest/meta-data/" for host in targets]
    answers = call(launcher, "spawn", "fetch_all", {"urls": urls}, ["--allow-net"])["answers"]
    for (host, why), answer in zip(targets.items(), answers, strict=True):
        assert _refused(answer) and why in answer["body"], (host, answer)


def test_the_workers_redis_is_never_reachable(launcher: Launcher, redis_url: str) -> None:
    """Not unscoped, and not even through a rule naming its address and port."""
    host, port = _redis_endpoint(redis_url)
    for flags in (["--allow-net"], [f"--allow-net={host}:{port}"]):
        routes = call(launcher, "warm", "every_route", {"host": host, "port": port}, flags)
        assert _refused(routes["fetch"]) and "worker's Redis" in routes["fetch"]["body"], routes
        for raw in ("connect", "node_net"):
            assert "PONG" not in str(routes[raw]), (flags, raw, routes[raw])


def test_rules_naming_address_and_port_reach_private_targets(
    launcher: Launcher, loopback: tuple[int, list[str]]
) -> None:
    port, hits = loopback
    for rule, url in (
        (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}/ip"),
        (f"localhost:{port}", f"http://localhost:{port}/name"),
        (f"[::1]:{port}", f"http://[::1]:{port}/v6"),
    ):
        answer = call(launcher, "spawn", "fetch", {"url": url}, [f"--allow-net={rule}"])
        assert answer["ok"] and answer["status"] == 200, (rule, answer)
    assert sorted(hits) == ["/ip", "/name", "/v6"]
    # a rule without a port, or a name, is not explicit enough for loopback
    for rule in ("localhost", "127.0.0.1"):
        answer = call(
            launcher, "spawn", "fetch", {"url": f"http://{rule}:{port}/no"}, [f"--allow-net={rule}"]
        )
        assert _refused(answer) and "loopback" in answer["body"], (rule, answer)
    assert "/no" not in hits


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_unscoped_net_reaches_a_public_host(
    launcher: Launcher, public_host: dict[str, Any], loopback: tuple[int, list[str]], mode: str
) -> None:
    port, hits = loopback
    target = f"http://{public_host['address']}:{public_host['port']}"
    answers = call(
        launcher,
        mode,
        "fetch_all",
        {
            "urls": [
                f"{target}/hello",
                f"{target}/redirect?to=http://127.0.0.1:{port}/stolen",
                f"http://{public_host['host_address']}:{port}/own",
            ]
        },
        ["--allow-net"],
    )["answers"]
    hello, redirected, own = answers
    assert hello["ok"] and hello["body"] == "public /hello", hello
    assert _refused(redirected) and "loopback" in redirected["body"], redirected
    assert _refused(own) and "worker's own host" in own["body"], own
    assert hits == []


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_raw_sockets_and_node_http_go_through_the_proxy(
    launcher: Launcher, public_host: dict[str, Any], loopback: tuple[int, list[str]], mode: str
) -> None:
    """Bun.connect, node:net and node:http (axios's Node adapter, got, database drivers)
    had no route under --allow-net: netshim.c carries them to the egress proxy, which
    decides as it does for fetch."""
    if launcher.sandbox is None or launcher.sandbox.netshim is None:
        pytest.fail("workers/runtime/netshim.so is not built (make setup builds it)")
    routes = call(
        launcher,
        mode,
        "every_route",
        {"host": public_host["address"], "port": public_host["port"]},
        ["--allow-net"],
    )
    assert routes["node_http"] == {"ok": True, "status": 200, "body": "public /node"}, routes
    for raw in ("connect", "node_net"):  # PING is not HTTP: the server answers 400
        assert routes[raw]["ok"] and "400" in routes[raw]["reply"], (raw, routes[raw])
    assert not routes["udp"]["ok"], routes["udp"]  # no route for UDP
    port, hits = loopback
    for target in ({"host": "localhost.", "port": port}, {"host": "127.0.0.1", "port": port}):
        refused = call(launcher, mode, "every_route", target, ["--allow-net"])
        for route in ("connect", "node_net", "node_http"):
            assert not refused[route]["ok"], (target, route, refused[route])
        if target["host"] == "localhost.":  # a name: the proxy resolved it, then refused
            assert "loopback" in refused["fetch"]["body"], refused
    assert hits == []


def test_a_call_cannot_starve_the_proxy_for_the_next(
    launcher: Launcher, loopback: tuple[int, list[str]]
) -> None:
    """66 tunnels left open made every later fetch on that worker fail with 503 for 300 s:
    now a call holds at most 32, and what it leaves open is closed when it ends."""
    port, _ = loopback
    flags = [f"--allow-net=127.0.0.1:{port}"]
    permissions = Permissions.parse(flags)
    pool = WarmRuntime(
        launcher, 1, max_calls_per_process=10, max_rss_mb=1024, permissions=permissions
    )
    try:
        limits = TimeLimits(20, 25)
        held = pool.run(
            Call(
                "hold_tunnels",
                "a",
                {"count": 66, "target": f"127.0.0.1:{port}"},
                {},
                limits,
                permissions=permissions,
            )
        )
        assert held.result is not None, held.error
        answers = held.result["answers"]
        assert answers.count("HTTP/1.1 200 Connection established") == 32, answers
        assert all("503" in answer or answer == "closed" for answer in answers[32:]), answers
        after = pool.run(
            Call(
                "fetch",
                "b",
                {"url": f"http://127.0.0.1:{port}/next"},
                {},
                limits,
                permissions=permissions,
            )
        )
        assert after.result is not None and after.result["status"] == 200, (
            after.result,
            after.error,
        )
    finally:
        pool.close()


def test_only_the_workers_tools_may_use_its_proxy(
    launcher: Launcher, loopback: tuple[int, list[str]]
) -> None:
    """The proxy's socket is reachable by any local user (the tools' uid must connect):
    it checks who connects (SO_PEERCRED), so a stranger gets nothing."""
    port, hits = loopback
    flags = [f"--allow-net=127.0.0.1:{port}"]
    directory = launcher._egress_dir(Permissions.parse(flags))
    assert directory is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
        stranger.connect(os.path.join(directory, "egress.sock"))
        # the proxy may answer and close before the request is sent (a loaded machine)
        with contextlib.suppress(BrokenPipeError):
            stranger.sendall(f"GET http://127.0.0.1:{port}/stranger HTTP/1.1\r\n\r\n".encode())
        reply = stranger.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 403") and "not a process of this worker" in reply
    assert hits == []


def test_internal_reason_covers_every_spelling() -> None:
    import ipaddress

    for text in (
        "127.0.0.1",
        "::1",
        "0.0.0.0",
        "::",
        "::ffff:127.0.0.1",
        "::127.0.0.1",
        "169.254.169.254",
        "fd00:ec2::254",
        "64:ff9b::7f00:1",
        "2002:7f00:1::",
        "10.1.2.3",
        "100.64.0.1",
        "255.255.255.255",
        "240.0.0.1",
    ):
        assert internal_reason(ipaddress.ip_address(text)) is not None, text
    for text in ("203.0.113.5", "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808"):
        assert internal_reason(ipaddress.ip_address(text)) is None, text


# -- the whole path: a real Celery worker, its real Redis -------------------------------------


def test_a_worker_keeps_its_redis_from_tools_granted_net(
    client: ToolClient, start_worker: StartWorker, redis_url: str, loopback: tuple[int, list[str]]
) -> None:
    host, port = _redis_endpoint(redis_url)
    queue = f"q-{uuid.uuid4().hex[:8]}"
    start_worker(queues=[queue], config=CONFIG, env={"TOOLQ_RUNTIME__SANDBOX": "required"})
    routes = client.run("every_route", {"host": host, "port": port}, queue=queue, wait=60)
    assert routes.result is not None, routes.error
    assert "worker's Redis" in routes.result["fetch"]["body"], routes.result
    for raw in ("connect", "node_net"):
        assert "PONG" not in str(routes.result[raw]), routes.result
    web_port, hits = loopback
    web = client.run("fetch", {"url": f"http://127.0.0.1:{web_port}/w"}, queue=queue, wait=60)
    assert web.result is not None and web.result["status"] == 403, web.result
    assert hits == []


def test_an_operator_may_share_the_host_network_knowingly(
    client: ToolClient, start_worker: StartWorker, loopback: tuple[int, list[str]]
) -> None:
    """runtime.unsafe_share_host_network: the old behaviour, for whoever asks for it."""
    port, hits = loopback
    queue = f"q-{uuid.uuid4().hex[:8]}"
    start_worker(
        queues=[queue],
        config=CONFIG,
        env={
            "TOOLQ_RUNTIME__SANDBOX": "required",
            "TOOLQ_RUNTIME__UNSAFE_SHARE_HOST_NETWORK": "true",
        },
    )
    web = client.run("fetch", {"url": f"http://127.0.0.1:{port}/shared"}, queue=queue, wait=60)
    assert web.result is not None and web.result["status"] == 200, web.result
    assert hits == ["/shared"]


# -- a "public" host: a server in a network namespace of the test's own -----------------------

_PUBLIC_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = ("public " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


@pytest.fixture
def public_host() -> Iterator[dict[str, Any]]:
    """A web server at a TEST-NET-3 address in a network namespace of this test's own,
    wired to the host by a veth pair: a host that is not this one, not private."""
    ip = shutil.which("ip")
    if os.geteuid() != 0 or ip is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    tag = uuid.uuid4().hex[:6]
    ns, outer, inner = f"toolq-{tag}", f"tqh{tag}", f"tqn{tag}"
    base = 4 * random.randrange(1, 63)
    host_address, address = f"203.0.113.{base + 1}", f"203.0.113.{base + 2}"

    def sh(*args: str) -> None:
        subprocess.run([ip, *args], check=True, capture_output=True)

    server = None
    try:
        sh("netns", "add", ns)
        sh("link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("link", "set", inner, "netns", ns)
        sh("addr", "add", f"{host_address}/30", "dev", outer)
        sh("link", "set", outer, "up")
        sh("-n", ns, "addr", "add", f"{address}/30", "dev", inner)
        sh("-n", ns, "link", "set", inner, "up")
        sh("-n", ns, "link", "set", "lo", "up")
        port = 8080
        server = subprocess.Popen(
            [ip, "netns", "exec", ns, sys.executable, "-c", _PUBLIC_SERVER, address, str(port)]
        )

        def answers() -> bool:
            with contextlib.suppress(OSError), socket.create_connection((address, port), 0.5):
                return True
            return False

        assert wait_until(answers, 10), "the test host's server did not start"
        yield {"address": address, "port": port, "host_address": host_address}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("link", "del", outer)
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("netns", "del", ns)
