"""What issue 10's sandbox hardening costs per call, against the sandbox as it was.

Interleaves, through the runner (no queue), a trivial tool in set-ups that add one
measure at a time to the previous sandbox ("before": bwrap as root, no user namespace,
no seccomp, no exec or FFI refusal), then a `fetch` of a local HTTP server over the host network
(`--allow-net` with `runtime.unsafe_share_host_network`) and through the egress proxy
(`--allow-net=127.0.0.1:PORT`). Prints the
median wall time per call and each set-up's ratio to "before", measured in the same run.

    .venv/bin/python bench/investigations/security_cost.py [--calls 100]
"""

from __future__ import annotations

import argparse
import http.server
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
from toolq.workers.runtime.sandbox import Sandbox, make_sandbox
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime

PROJECT = Path(__file__).resolve().parents[2] / "tests" / "tools"
_UID_FLAGS = {"--unshare-user": 0, "--disable-userns": 0, "--uid": 1, "--gid": 1}


class Stage(Sandbox):
    """The sandbox with some of today's measures switched off (for comparison only)."""

    def __init__(
        self, base: Sandbox, *, uid: bool, seccomp: bool, no_exec: bool, no_ffi: bool
    ) -> None:
        self.__dict__.update(base.__dict__)
        self.uid, self.seccomp, self.no_exec, self.no_ffi = uid, seccomp, no_exec, no_ffi
        if not uid:
            self.run_as = None

    def wrapper_options(self, permissions: Permissions) -> list[str]:
        options = super().wrapper_options(permissions)
        return options if self.no_exec else [o for o in options if "no-exec" not in o]

    def command(self, permissions: Permissions, argv: list[str], **kw: Any) -> list[str]:
        if not self.no_ffi:
            argv = [arg for arg in argv if arg != "--toolq-no-ffi"]
        args = super().command(permissions, argv, **kw)
        out: list[str] = []
        skip = 0
        for arg in args[: len(args) - len(argv)]:
            if skip:
                skip -= 1
            elif not self.uid and arg in _UID_FLAGS:
                skip = _UID_FLAGS[arg]
            elif not self.seccomp and arg == "--seccomp":
                skip = 1
            else:
                out.append(arg)
        return out + argv


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    bun = find_bun(None, PROJECT)
    base = make_sandbox("required", bun, WRAPPER, PROJECT)
    assert base is not None
    cgroups = Cgroups.detect()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def launcher(**stage: bool) -> Launcher:
        return Launcher(
            bun,
            PROJECT / "entrypoint.ts",
            PROJECT,
            sandbox=Stage(base, **stage),
            cgroups=cgroups,
        )

    stages = {
        "before": launcher(uid=False, seccomp=False, no_exec=False, no_ffi=False),
        "+uid": launcher(uid=True, seccomp=False, no_exec=False, no_ffi=False),
        "+uid+seccomp": launcher(uid=True, seccomp=True, no_exec=False, no_ffi=False),
        "+no-exec": launcher(uid=True, seccomp=True, no_exec=True, no_ffi=False),
        "now (+no-ffi)": launcher(uid=True, seccomp=True, no_exec=True, no_ffi=True),
    }
    noop = Call("echo", "bench", {}, {}, TimeLimits(10, 12))
    fetch = {"url": f"http://127.0.0.1:{port}/"}
    runs: dict[str, tuple[Any, Call]] = {}
    pools: list[WarmRuntime] = []
    for name, stage in stages.items():
        runs[f"spawn noop {name}"] = (SpawnRuntime(stage), noop)
        pool = WarmRuntime(stage, 1, max_calls_per_process=10**6, max_rss_mb=1024)
        pool.start()
        pools.append(pool)
        runs[f"warm noop {name}"] = (pool, noop)
    now = stages["now (+no-ffi)"]
    # The host's network is runtime.unsafe_share_host_network now (an unscoped
    # --allow-net goes through the proxy too, and may not reach loopback).
    host_net = launcher(uid=True, seccomp=True, no_exec=True, no_ffi=True)
    assert host_net.sandbox is not None
    host_net.sandbox.unsafe_share_host_network = True
    for label, flags, via in (
        ("host net", ["--allow-net"], host_net),
        ("proxied", [f"--allow-net=127.0.0.1:{port}"], now),
    ):
        permissions = Permissions.parse(flags)
        call = Call("fetch", "bench", fetch, {}, TimeLimits(10, 12), permissions=permissions)
        runs[f"spawn fetch {label}"] = (SpawnRuntime(via), call)
        pool = WarmRuntime(
            via, 1, max_calls_per_process=10**6, max_rss_mb=1024, permissions=permissions
        )
        pool.start()
        pools.append(pool)
        runs[f"warm fetch {label}"] = (pool, Call("fetch", "bench", fetch, {}, TimeLimits(10, 12)))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for runner, call in runs.values():
        for _ in range(3):
            runner.run(call)
    for _ in range(args.calls):
        for name, (runner, call) in runs.items():
            started = time.perf_counter()
            outcome = runner.run(call)
            times[name].append((time.perf_counter() - started) * 1000)
            assert outcome.error is None, (name, outcome.error)
            if "fetch" in name:
                assert outcome.result is not None and outcome.result["ok"], (name, outcome.result)
    for pool in pools:
        pool.close()
    server.shutdown()
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'set-up':34} {'median ms':>10} {'ratio':>7}")
    for name, value in medians.items():
        mode, what = name.split(" ", 2)[:2]
        reference = (
            medians[f"{mode} noop before"] if what == "noop" else medians[f"{mode} fetch host net"]
        )
        print(f"{name:34} {value:10.2f} {value / reference:6.2f}x")


if __name__ == "__main__":
    main()
