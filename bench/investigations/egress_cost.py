"""What the egress proxy as the only route costs, against the host network it replaced.

Issue 21 took the host's network away from tools granted unscoped `--allow-net`: every
network grant now goes through the worker's egress proxy (and raw TCP through the
preloaded netshim). This interleaves, through the runner (no queue), the same calls with
the old set-up (`runtime.unsafe_share_host_network`: the sandbox shares the host's
network namespace) and the new one, in the same run, spawn (started ahead, as by
default) and warm:

- a no-op tool: what a process with a network grant costs to start and call;
- `fetch` of a local HTTP server (keep-alive), and a raw TCP connect (`Bun.connect`) that
  sends a line and reads the answer: what one connection costs.

A loopback server is reached through a rule naming its address and port (the new
set-up refuses loopback otherwise). Prints the median wall time per call and the ratio
new/old for each.

    .venv/bin/python bench/investigations/egress_cost.py [--calls 100]
"""

from __future__ import annotations

import argparse
import copy
import http.server
import socketserver
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from toolq.config.settings import TimeLimits
from toolq.permissions import Permissions
from toolq.workers.runtime.base import Call
from toolq.workers.runtime.bun import WRAPPER, find_bun
from toolq.workers.runtime.launch import Launcher
from toolq.workers.runtime.limits import Cgroups
from toolq.workers.runtime.sandbox import make_sandbox
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime

PROJECT = Path(__file__).resolve().parents[2] / "tests" / "projects" / "netprobe"


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data = self.request.recv(1024)
        self.request.sendall(b"+" + data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    bun = find_bun(None, PROJECT)
    base = make_sandbox("required", bun, WRAPPER, PROJECT)
    assert base is not None
    if base.netshim is None:
        raise SystemExit("workers/runtime/netshim.so is not built: make setup")
    host = copy.copy(base)
    host.unsafe_share_host_network = True
    cgroups = Cgroups.detect()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    for server in (web, echo):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    web_port, echo_port = web.server_address[1], echo.server_address[1]
    launchers = {
        "host network": (
            Launcher(bun, PROJECT / "entrypoint.ts", PROJECT, sandbox=host, cgroups=cgroups),
            ["--allow-net"],
        ),
        "egress proxy": (
            Launcher(bun, PROJECT / "entrypoint.ts", PROJECT, sandbox=base, cgroups=cgroups),
            [f"--allow-net=127.0.0.1:{web_port},localhost:{echo_port}"],
        ),
    }
    work = {
        "noop": ("fetch_all", {"urls": []}),
        "fetch": ("fetch", {"url": f"http://127.0.0.1:{web_port}/"}),
        # a name (not 127.0.0.1): the shim leaves the sandbox's own loopback alone
        "raw tcp": ("connect", {"host": "localhost.", "port": echo_port}),
    }
    runs: dict[str, tuple[Any, Call]] = {}
    pools: list[WarmRuntime] = []
    for label, (launcher, flags) in launchers.items():
        permissions = Permissions.parse(flags)
        spawn = SpawnRuntime(launcher)
        pool = WarmRuntime(
            launcher, 1, max_calls_per_process=10**6, max_rss_mb=1024, permissions=permissions
        )
        pool.start()
        pools.append(pool)
        for what, (tool, payload) in work.items():
            call = Call(tool, "bench", payload, {}, TimeLimits(10, 12), permissions=permissions)
            runs[f"spawn {what} | {label}"] = (spawn, call)
            runs[f"warm {what} | {label}"] = (pool, call)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for runner, call in runs.values():
        for _ in range(3):
            runner.run(call)
    for _ in range(args.calls):
        for name, (runner, call) in runs.items():
            started = time.perf_counter()
            outcome = runner.run(call)
            times[name].append((time.perf_counter() - started) * 1000)
            assert outcome.result is not None, (name, outcome.error, outcome.stderr)
            if "noop" not in name:
                assert outcome.result.get("ok"), (name, outcome.result)
            # spawn mode started ahead: let the replacement start outside the measurement
            time.sleep(0.02)
    for pool in pools:
        pool.close()
    for server in (web, echo):
        server.shutdown()
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'call':24} {'host network':>13} {'egress proxy':>13} {'ratio':>7}")
    for mode in ("spawn", "warm"):
        for what in work:
            old = medians[f"{mode} {what} | host network"]
            new = medians[f"{mode} {what} | egress proxy"]
            print(f"{mode + ' ' + what:24} {old:10.2f} ms {new:10.2f} ms {new / old:6.2f}x")


if __name__ == "__main__":
    main()
