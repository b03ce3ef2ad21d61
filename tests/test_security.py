"""Issue 10, the sandbox half: each escape tried as an attacker would, each grant at its edge.

Real bwrap, real Bun, the real runner; a caller controls a call's input and env, a
tool is hostile. Each test names the line of the threat model it proves
(docs/security/threat-model.md).
"""

from __future__ import annotations

import http.server
import os
import shutil
import ssl
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOOLS, StartWorker
from toolq.config.settings import TimeLimits
from toolq.errors import ConfigError, InvalidInput
from toolq.permissions import Permissions, parse_net_rule
from toolq.producers.client import ToolClient
from toolq.validation import validate_env
from toolq.workers.runtime.base import DEFAULT_RESOURCES, Call, Outcome
from toolq.workers.runtime.bun import WRAPPER
from toolq.workers.runtime.launch import Launcher, call_tmpdir, sweep_tmpdirs
from toolq.workers.runtime.limits import Cgroups, ResourceLimits
from toolq.workers.runtime.sandbox import make_sandbox
from toolq.workers.runtime.seccomp import (
    AARCH64,
    DENIED,
    X86_64,
    Arch,
    no_exec_filter,
    sandbox_filter,
)
from toolq.workers.runtime.spawn import SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime

EPERM = -1


@pytest.fixture(scope="module")
def launcher(bun: Path) -> Launcher:
    sandbox = make_sandbox("required", bun, WRAPPER, TOOLS)
    return Launcher(bun, TOOLS / "entrypoint.ts", TOOLS, sandbox=sandbox, cgroups=Cgroups.detect())


def run(
    launcher: Launcher,
    tool_id: str,
    payload: Any,
    flags: list[str],
    env: dict[str, str] | None = None,
    resources: ResourceLimits = DEFAULT_RESOURCES,
) -> Outcome:
    call = Call(
        tool_id,
        "security-test",
        payload,
        env or {},
        TimeLimits(10, 12),
        permissions=Permissions.parse(flags),
        resources=resources,
    )
    return SpawnRuntime(launcher).run(call)


def result(launcher: Launcher, tool_id: str, payload: Any, flags: list[str], **kw: Any) -> Any:
    outcome = run(launcher, tool_id, payload, flags, **kw)
    assert outcome.result is not None, (outcome.error, outcome.stderr[-2000:])
    return outcome.result


def warm_result(launcher: Launcher, tool_id: str, payload: Any, flags: list[str]) -> Any:
    pool = WarmRuntime(
        launcher, 1, max_calls_per_process=10, max_rss_mb=1024, permissions=Permissions.parse(flags)
    )
    try:
        outcome = pool.run(Call(tool_id, "w", payload, {}, TimeLimits(10, 12)))
    finally:
        pool.close()
    assert outcome.result is not None, (outcome.error, outcome.stderr[-2000:])
    return outcome.result


# -- 1. the call's env never reaches the launcher ------------------------------------------


def test_bun_options_in_call_env_does_not_replace_the_tool(launcher: Launcher) -> None:
    """Caller: BUN_OPTIONS=--eval ran the caller's code instead of the tool (spawn mode)."""
    marker = f"pwned-{uuid.uuid4().hex}"
    outcome = run(
        launcher,
        "echo",
        {"tool": "ran"},
        [],
        env={"BUN_OPTIONS": f"--eval=console.error('{marker}');process.exit(0)"},
    )
    assert marker not in outcome.stderr
    assert outcome.result == {"echo": {"tool": "ran"}}, outcome.error


def test_loader_variables_in_call_env_do_not_reach_bwrap(
    launcher: Launcher, tmp_path: Path
) -> None:
    """Caller: LD_PRELOAD/LD_AUDIT in a call's env ran a library in bwrap, on the host, as root.

    The runner is called directly (no validate_env) to prove the launch path itself."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the library")
    marker = tmp_path / "loaded.txt"
    source = tmp_path / "evil.c"
    source.write_text(
        "#include <stdio.h>\n#include <unistd.h>\n"
        "unsigned int la_version(unsigned int v) { return v; }\n"
        "__attribute__((constructor)) static void hit(void) {\n"
        f'  FILE *f = fopen("{marker}", "a"); if (f) {{ fprintf(f, "uid=%d\\n", getuid()); '
        "fclose(f); }\n}\n"
    )
    library = tmp_path / "evil.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    library.chmod(0o755)
    for name in ("LD_PRELOAD", "LD_AUDIT"):
        outcome = run(launcher, "echo", {"n": name}, [], env={name: str(library)})
        assert outcome.result == {"echo": {"n": name}}, outcome.error
        assert not marker.exists(), f"{name} loaded {library}: {marker.read_text()}"


def test_call_env_reaches_the_tool_not_its_module_top_level(launcher: Launcher) -> None:
    """The call's env is set inside the sandbox just before the tool runs: the entrypoint
    was loaded before the call was known (spawn processes start ahead of demand, as warm
    ones do), so its top level sees only the base environment."""
    status = result(launcher, "self_status", {}, [], env={"LOAD_TIME_PROBE": "seen"})
    assert status["env_at_load"] is None
    env = result(launcher, "env", {"keys": ["API_TOKEN"]}, [], env={"API_TOKEN": "t0k"})
    assert env == {"env": {"API_TOKEN": "t0k"}}


@pytest.mark.parametrize(
    "name",
    [
        "LD_AUDIT",
        "LD_PRELOAD",
        "LD_DEBUG",
        "GLIBC_TUNABLES",
        "MALLOC_ARENA_MAX",
        "GCONV_PATH",
        "BUN_OPTIONS",
        "BUN_JSC_useJIT",
        "JSC_useJIT",
        "NODE_OPTIONS",
        "NODE_EXTRA_CA_CERTS",
        "DYLD_INSERT_LIBRARIES",
        "TMPDIR",
        "PATH",
        "HOME",
        "IFS",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
        "RES_OPTIONS",
        "LOCALDOMAIN",
        "TZDIR",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "OPENSSL_CONF",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "BASH_ENV",
        "ENV",
        "PYTHONSTARTUP",
        "PERL5OPT",
        "GIT_SSH_COMMAND",
        "__LIBC",
        "TOOLQ_SECRET_KEY",
        "http_proxy",
        "ld_preload",
    ],
)
def test_env_names_that_change_the_runtime_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match=r"not allowed|invalid env name"):
        validate_env({name: "x"})


def test_plain_env_names_are_accepted() -> None:
    env = {"API_KEY": "k", "LANG": "C.UTF-8", "TZ": "UTC", "REGION_1": "eu", "LC_ALL": "C"}
    assert validate_env(env) == env


# -- 2. unprivileged tools --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_tool_is_unprivileged_with_no_new_privileges_and_seccomp(
    launcher: Launcher, mode: str
) -> None:
    get = result if mode == "spawn" else warm_result
    status = get(launcher, "self_status", {}, ["--allow-read"])
    assert status["uid"].split() == ["65534"] * 4
    assert status["gid"].split() == ["65534"] * 4
    assert status["no_new_privs"] == "1"
    assert status["seccomp"] == "2"  # filter mode
    assert int(status["cap_eff"], 16) == 0


def test_root_only_host_files_stay_unreadable_under_allow_read(launcher: Launcher) -> None:
    """Tool: as root in the sandbox, /etc/shadow was readable under --allow-read."""
    if os.geteuid() != 0:
        pytest.skip("the worker is not root: its own files are what the tool may read")
    shadow = result(launcher, "probe", {"action": "read", "path": "/etc/shadow"}, ["--allow-read"])
    assert not shadow["ok"] and "EACCES" in shadow["error"], shadow
    assert result(launcher, "probe", {"action": "read", "path": "/etc/passwd"}, ["--allow-read"])[
        "ok"
    ]


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_seccomp_denies_what_a_tool_never_needs(launcher: Launcher, mode: str) -> None:
    """Tool: ptrace, process_vm_readv, new namespaces, keyrings, bpf, io_uring… get EPERM."""
    get = result if mode == "spawn" else warm_result
    calls = get(launcher, "syscalls", {}, ["--allow-read", "--allow-ffi"])
    for name in (
        "ptrace",
        "process_vm_readv",
        "unshare",
        "personality",
        "keyctl",
        "bpf",
        "mount",
        "io_uring_setup",
    ):
        assert calls[name] == EPERM, (name, calls)
    assert calls["clone3"] == -38  # ENOSYS: libc falls back to clone, whose flags are checked
    assert calls["getppid"] >= 0  # everything else works


def test_seccomp_programs_are_well_formed() -> None:
    for arch in (X86_64, AARCH64):
        for program in (sandbox_filter(arch), no_exec_filter(arch)):
            assert len(program) % 8 == 0 and len(program) // 8 < 4096
            # first: load the arch, compare with this arch, else kill the process
            assert program[:8] == bytes.fromhex("2000000004000000")
            assert int.from_bytes(program[12:16], "little") == arch.audit
            assert program[16:24] == bytes.fromhex("0600000000000080")
    x86 = sandbox_filter(X86_64)
    assert bytes.fromhex("3500") in x86  # the x32 check (nr >= 0x40000000)


def _run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """A tiny classic-BPF interpreter for the opcodes the filters use."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    code = [struct.unpack_from("<HBBI", program, at) for at in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        if op == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif op in (0x15, 0x35, 0x45):  # jeq, jge, jset
            hit = acc == k if op == 0x15 else acc >= k if op == 0x35 else bool(acc & k)
            pc += 1 + (jt if hit else jf)
        elif op == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")


@pytest.mark.parametrize("arch", [X86_64, AARCH64], ids=["x86_64", "aarch64"])
def test_seccomp_program_semantics(arch: Arch) -> None:
    program = sandbox_filter(arch)
    deny, allow = 0x00050000 | 1, 0x7FFF0000
    for name in DENIED:
        if name in arch.numbers:
            assert _run_bpf(program, arch.numbers[name], arch.audit) == deny, name
    clone = arch.numbers["clone"]
    assert _run_bpf(program, clone, arch.audit, (0x11,)) == allow  # fork-like
    assert _run_bpf(program, clone, arch.audit, (0x3D0F00,)) == allow  # a thread
    for flag in (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert _run_bpf(program, clone, arch.audit, (flag | 0x11,)) == deny, hex(flag)
    assert _run_bpf(program, arch.numbers["clone3"], arch.audit) == 0x00050000 | 38
    assert _run_bpf(program, 0, arch.audit) == allow  # read / io_setup
    assert _run_bpf(program, 0, 0x40000003) == 0x80000000  # i386: kill the process
    if arch is X86_64:
        assert _run_bpf(program, 0x40000000 + 1, arch.audit) == deny  # x32 ABI
    no_exec = no_exec_filter(arch)
    assert _run_bpf(no_exec, arch.numbers["execve"], arch.audit) == deny
    assert _run_bpf(no_exec, arch.numbers["execveat"], arch.audit) == deny
    assert _run_bpf(no_exec, arch.numbers["clone"], arch.audit) == allow


def test_a_tree_the_tool_uid_cannot_read_is_refused_at_start(bun: Path, tmp_path: Path) -> None:
    """A root worker whose project is private to root would fail every call: say so once."""
    if os.geteuid() != 0:
        pytest.skip("only a root worker drops to uid 65534")
    project = tmp_path / "private"
    project.mkdir(mode=0o700)
    (project / "entrypoint.ts").write_text("export default {};\n")
    with pytest.raises(ConfigError, match=r"uid 65534 cannot read .*private.*chmod o\+rX"):
        make_sandbox("required", bun, WRAPPER, project, project / "entrypoint.ts")


# -- 3. every permission exactly as granted ---------------------------------------------------


def test_allow_env_names_only_those(launcher: Launcher, monkeypatch: pytest.MonkeyPatch) -> None:
    """--allow-env=API_KEY gave the tool the worker's whole environment."""
    monkeypatch.setenv("WORKER_GRANTED", "yes")
    monkeypatch.setenv("WORKER_SECRET", "no")
    keys = {"keys": ["WORKER_GRANTED", "WORKER_SECRET"]}
    env = result(launcher, "env", keys, ["--allow-env=WORKER_GRANTED"])["env"]
    assert env == {"WORKER_GRANTED": "yes", "WORKER_SECRET": None}
    env = result(launcher, "env", keys, ["--allow-env"])["env"]
    assert env == {"WORKER_GRANTED": "yes", "WORKER_SECRET": "no"}


def test_the_workers_own_settings_never_reach_a_tool(
    launcher: Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--allow-env handed a tool TOOLQ_REDIS_URL, password and all: the keys to every
    project's calls on that Redis."""
    monkeypatch.setenv("TOOLQ_REDIS_URL", "redis://:hunter2@redis:6379/0")
    keys = {"keys": ["TOOLQ_REDIS_URL"]}
    for flags in (["--allow-env"], ["--allow-env=TOOLQ_REDIS_URL"]):
        assert result(launcher, "env", keys, flags)["env"] == {"TOOLQ_REDIS_URL": None}, flags


BIG = bytes(range(256)) * (5 * 4096)  # 5 MiB
BIG_SUM = sum(BIG) % 65521


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.server.server_address[1]}{self.path}".encode()
        if self.path == "/big":
            body = BIG
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web() -> Iterator[tuple[int, int]]:
    """Two local HTTP servers: one to allow, one just beyond the grant."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers[0].server_address[1], servers[1].server_address[1]
    for server in servers:
        server.shutdown()
        server.server_close()


def test_allow_net_scoped_to_host_and_port(launcher: Launcher, web: tuple[int, int]) -> None:
    """--allow-net=127.0.0.1:8080 allowed every host and port."""
    allowed, other = web
    flags = [f"--allow-net=127.0.0.1:{allowed}"]
    ok = result(launcher, "fetch", {"url": f"http://127.0.0.1:{allowed}/x"}, flags)
    with_read = result(
        launcher, "fetch", {"url": f"http://127.0.0.1:{allowed}/x"}, ["--allow-read", *flags]
    )
    assert with_read == ok
    assert ok == {"ok": True, "status": 200, "body": f"hello from {allowed}/x"}
    denied = result(launcher, "fetch", {"url": f"http://127.0.0.1:{other}/x"}, flags)
    assert denied["status"] == 403
    assert f"toolq: 127.0.0.1:{other} not in --allow-net=127.0.0.1:{allowed}" in denied["body"]
    big = result(launcher, "fetch_size", {"url": f"http://127.0.0.1:{allowed}/big"}, flags)
    assert big == {"status": 200, "bytes": len(BIG), "sum": BIG_SUM}
    https = result(launcher, "fetch", {"url": "https://api.example.com/"}, flags)
    assert not https["ok"] and "api.example.com:443 not in --allow-net" in https["error"], https
    # no way around the proxy: the sandbox has no network of its own
    raw = result(launcher, "probe", {"action": "connect", "port": allowed}, flags)
    assert not raw["ok"]


@pytest.fixture
def tls_web(tmp_path: Path) -> Iterator[int]:
    """A local HTTPS server with a throw-away self-signed certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_allow_net_scoped_https_goes_through_connect(
    launcher: Launcher, tls_web: int, web: tuple[int, int], mode: str
) -> None:
    get = result if mode == "spawn" else warm_result
    flags = [f"--allow-net=127.0.0.1:{tls_web}"]
    payload = {"url": f"https://127.0.0.1:{tls_web}/s", "insecure": True}
    assert get(launcher, "fetch", payload, flags) == {
        "ok": True,
        "status": 200,
        "body": f"hello from {tls_web}/s",
    }
    other = get(launcher, "fetch", {"url": f"http://127.0.0.1:{web[0]}/"}, flags)
    assert other["status"] == 403
    big = get(launcher, "fetch_size", {**payload, "url": f"https://127.0.0.1:{tls_web}/big"}, flags)
    assert big == {"status": 200, "bytes": len(BIG), "sum": BIG_SUM}


def test_allow_net_by_name_and_wildcard(launcher: Launcher, web: tuple[int, int]) -> None:
    allowed, _ = web
    ok = result(
        launcher,
        "fetch",
        {"url": f"http://localhost:{allowed}/n"},
        [f"--allow-net=localhost:{allowed}"],
    )
    assert ok["ok"] and ok["body"] == f"hello from {allowed}/n"
    # a name without a port does not reach loopback (tests/test_network.py has the rest)
    bare = result(
        launcher, "fetch", {"url": f"http://localhost:{allowed}/n"}, ["--allow-net=localhost"]
    )
    assert bare["status"] == 403 and "loopback" in bare["body"], bare
    denied = result(
        launcher, "fetch", {"url": f"http://localhost:{allowed}/n"}, ["--allow-net=*.example.com"]
    )
    assert denied["status"] == 403 and "not in --allow-net=*.example.com" in denied["body"]
    rule = parse_net_rule("*.example.com")
    assert rule.matches("api.example.com", 443) and not rule.matches("example.com.evil", 443)


def test_allow_net_unscoped_is_not_the_host_network(
    launcher: Launcher, web: tuple[int, int]
) -> None:
    """Unscoped --allow-net was the host's network, loopback included: now it is the public
    network through the egress proxy (tests/test_network.py tries every route)."""
    allowed, _ = web
    refused = result(launcher, "fetch", {"url": f"http://127.0.0.1:{allowed}/"}, ["--allow-net"])
    assert refused["status"] == 403 and "loopback" in refused["body"], refused
    assert not result(launcher, "fetch", {"url": f"http://127.0.0.1:{allowed}/"}, [])["ok"]


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_no_program_runs_without_allow_run(launcher: Launcher, mode: str) -> None:
    """--allow-read without --allow-run still let a tool start /bin/sh and any program."""
    get = result if mode == "spawn" else warm_result
    shell = get(launcher, "run", {"argv": ["/bin/sh", "-c", "exit 0"]}, ["--allow-read"])
    assert not shell["ok"] and "EPERM" in shell["error"], shell
    own = get(launcher, "run_own_copy", {"program": "/bin/true"}, ["--allow-read"])
    assert not own["ok"] and "EPERM" in own["error"], own
    bun = get(launcher, "run", {"argv": [str(launcher.bun), "--version"]}, ["--allow-read"])
    assert not bun["ok"], bun


def test_allow_run_programs_exposes_only_those(launcher: Launcher) -> None:
    flags = ["--allow-run=ls"]
    assert result(launcher, "run", {"argv": ["ls", "/"]}, flags)["ok"]
    for argv in (["sh", "-c", "exit 0"], ["cat", "/etc/hostname"], ["/bin/sh", "-c", "true"]):
        assert not result(launcher, "run", {"argv": argv}, flags)["ok"], argv
    assert result(launcher, "run", {"argv": ["/bin/sh", "-c", "exit 0"]}, ["--allow-run"])["ok"]


def test_ffi_needs_allow_ffi(launcher: Launcher) -> None:
    """--allow-ffi was refused as unknown, while bun:ffi loaded without it."""
    denied = result(launcher, "ffi", {}, ["--allow-read"])
    assert not denied["ok"] and "needs --allow-ffi" in denied["error"], denied
    assert result(launcher, "ffi", {}, ["--allow-read", "--allow-ffi"])["ok"]


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_every_route_to_native_code_needs_allow_ffi(launcher: Launcher, mode: str) -> None:
    """bun:ffi, its bare alias, Bun.FFI, process.dlopen, SQLite extensions and Workers (own
    module objects): Bun.FFI, Workers and loadExtension each ran native code before."""
    get = result if mode == "spawn" else warm_result
    routes = get(launcher, "ffi_routes", {}, ["--allow-read"])
    assert all("needs --allow-ffi" in outcome for outcome in routes.values()), routes
    granted = get(launcher, "ffi_routes", {}, ["--allow-read", "--allow-ffi"])
    loading = (
        "process_dlopen",
        "sqlite_extension",
        "sqlite_custom",
        "node_sqlite_extension",
        "node_sqlite_via_constructor",
    )
    worked = ("import", "require", "bare_alias", "bun_ffi", "worker", "worker_threads")
    assert {k: v for k, v in granted.items() if k not in loading} == dict.fromkeys(
        (*worked, "worker_via_constructor"), "worked"
    ), granted
    for route in loading:  # a real loader error (no such file, no init symbol) instead
        assert "needs --allow-ffi" not in granted[route], granted


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_guarded_objects_can_be_copied_and_enumerated(launcher: Launcher, mode: str) -> None:
    """Issue 22: without --allow-ffi, `{...process}` (chalk, commander, prettier, got at
    import) threw "needs --allow-ffi": a guard refuses native code when it is used, never
    when an object is read, copied, spread or enumerated (default permissions: every guard
    installed)."""
    get = result if mode == "spawn" else warm_result
    copied = get(launcher, "copy_guarded", {}, [])
    assert copied["ok"] and copied["process_keys"] > 0, copied
    failures = copied["failures"]
    guards = [f for each in failures.values() for f in each if "toolq" in f or "allow-ffi" in f]
    assert guards == [], guards
    # (Bun's own prototype accessors throw on the prototype itself, guards or not)
    whole = ("process", "Bun", "globalThis", "Bun.FFI", "bun:ffi", "ffi", "node:child_process")
    assert [name for name in whole if failures[name]] == [], failures


def test_allow_all_grants_everything(launcher: Launcher, web: tuple[int, int]) -> None:
    allowed, _ = web
    for flags in (["--allow-all"], ["-A"]):
        # the public network, as unscoped --allow-net: loopback stays out of reach
        local = result(launcher, "fetch", {"url": f"http://127.0.0.1:{allowed}/"}, flags)
        assert local["status"] == 403 and "loopback" in local["body"], local
        assert result(launcher, "run", {"argv": ["/bin/sh", "-c", "exit 0"]}, flags)["ok"]
        assert result(launcher, "ffi", {}, flags)["ok"]


def test_allow_hrtime_and_sys_are_accepted() -> None:
    assert Permissions.parse(["--allow-hrtime", "--allow-sys"]) == Permissions(
        sys=True, hrtime=True
    )


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--allow-sys=hostname", "cannot enforce a scoped --allow-sys"),
        ("--allow-ffi=/lib/x.so", "cannot enforce a scoped --allow-ffi"),
        ("--allow-hrtime=1", "cannot enforce a scoped --allow-hrtime"),
        ("--allow-all=yes", "takes no value"),
        ("--allow-net=http://x.com/path", "cannot enforce other forms"),
        ("--allow-net=*", "cannot enforce other forms"),
        ("--allow-net=", "empty list"),
        ("--allow-env=A-B", "not variable names"),
        ("--allow-read=relative/path", "must be absolute"),
        ("--allow-everything", "unknown permission"),
    ],
)
def test_unenforceable_forms_are_refused_at_config_load(
    tmp_path: Path, flag: str, message: str
) -> None:
    from toolq.config import load_settings

    config = tmp_path / "c.yaml"
    config.write_text(f"runtime:\n  permissions: ['{flag}']\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(config, environ={})
    assert flag.split("=")[0] in str(info.value)


def test_allow_run_programs_with_the_whole_filesystem_is_refused(tmp_path: Path) -> None:
    from toolq.config import load_settings

    config = tmp_path / "c.yaml"
    config.write_text("tools:\n  t:\n    permissions: [--allow-read, --allow-run=git]\n")
    with pytest.raises(ConfigError, match="--allow-run=PROGRAMS with the whole filesystem"):
        load_settings(config, environ={})


def test_allow_sys_is_needed_for_sys_even_under_allow_read(launcher: Launcher) -> None:
    """--allow-read bound / recursively: the host's /sys came with it."""
    online = {"action": "read", "path": "/sys/devices/system/cpu/online"}
    assert not result(launcher, "probe", online, ["--allow-read"])["ok"]
    assert result(launcher, "probe", online, ["--allow-read", "--allow-sys"])["ok"]


# -- 4. bounded temp space --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["spawn", "warm"])
def test_tmpdir_is_capped(launcher: Launcher, mode: str) -> None:
    """Tool: TMPDIR was an uncapped host directory (2 GB written in 0.76 s)."""
    small = ResourceLimits(512, 64, 256, None, max_tmp_mb=8)
    if mode == "spawn":
        filled = result(launcher, "fill_tmp", {"mb": 64}, [], resources=small)
    else:
        pool = WarmRuntime(launcher, 1, max_calls_per_process=10, max_rss_mb=1024, resources=small)
        try:
            outcome = pool.run(Call("fill_tmp", "w", {"mb": 64}, {}, TimeLimits(10, 12)))
            after = pool.run(Call("tmp_list", "w", {}, {}, TimeLimits(10, 12)))
        finally:
            pool.close()
        assert outcome.result is not None, outcome.error
        filled = outcome.result
        assert after.result is not None and after.result["entries"] == []  # emptied
    assert filled["full"] and "ENOSPC" in filled["error"], filled
    assert filled["written_mb"] <= 8


def test_only_tmp_and_granted_paths_are_writable(launcher: Launcher) -> None:
    """/dev (and /dev/shm) were an uncapped writable tmpfs beside the capped /tmp."""
    for path in ("/dev/shm/x", "/dev/x", "/x"):
        assert not result(launcher, "probe", {"action": "write", "path": path}, [])["ok"], path
    devnull = result(launcher, "probe", {"action": "write", "path": "/dev/null"}, [])
    assert devnull["ok"], devnull


def test_max_tmp_mb_per_tool(tmp_path: Path) -> None:
    from toolq.config import load_settings
    from toolq.workers.profile import resource_limits

    config = tmp_path / "c.yaml"
    config.write_text("runtime:\n  max_tmp_mb: 16\ntools:\n  big:\n    limits: {max_tmp_mb: 256}\n")
    settings = load_settings(config, environ={})
    assert resource_limits(settings, "big").max_tmp_mb == 256
    assert resource_limits(settings, "other").max_tmp_mb == 16
    assert resource_limits(load_settings(None, environ={}), "x").max_tmp_mb == 64


def test_dead_workers_temp_dirs_are_swept() -> None:
    """Killed workers left /tmp/toolq-* directories behind (38 after one soak)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = Path("/tmp") / f"toolq-call-{dead.pid}-{uuid.uuid4().hex[:8]}"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "data").write_text("x")
    mine = Path(call_tmpdir())
    try:
        removed = sweep_tmpdirs("/tmp")
        assert str(leftover) in removed and not leftover.exists()
        assert mine.exists()  # this worker is alive: its directory stays
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        shutil.rmtree(leftover, ignore_errors=True)


# -- through real Celery workers ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["warm", "spawn"])
def test_worker_enforces_scoped_net_and_runs_tools_unprivileged(
    client: ToolClient, start_worker: StartWorker, web: tuple[int, int], mode: str
) -> None:
    """The whole path: config (env layer) -> Celery worker -> sandbox, as CI runs it (root)."""
    allowed, other = web
    queue = f"q-{uuid.uuid4().hex[:8]}"
    start_worker(
        queues=[queue],
        env={
            "TOOLQ_RUNTIME__MODE": mode,
            "TOOLQ_RUNTIME__SANDBOX": "required",
            "TOOLQ_RUNTIME__PERMISSIONS": f"[--allow-read, --allow-net=127.0.0.1:{allowed}]",
        },
    )
    ok = client.run("fetch", {"url": f"http://127.0.0.1:{allowed}/w"}, queue=queue, wait=60)
    assert ok.result == {"ok": True, "status": 200, "body": f"hello from {allowed}/w"}, ok.error
    denied = client.run("fetch", {"url": f"http://127.0.0.1:{other}/w"}, queue=queue, wait=60)
    assert denied.result is not None and denied.result["status"] == 403, denied
    status = client.run("self_status", {}, queue=queue, wait=60)
    assert status.result is not None and status.result["uid"].split() == ["65534"] * 4
    shell = client.run("run", {"argv": ["/bin/sh", "-c", "true"]}, queue=queue, wait=60)
    assert shell.result is not None and not shell.result["ok"], shell
    with pytest.raises(InvalidInput, match="LD_AUDIT"):
        client.run("echo", {}, env={"LD_AUDIT": "/tmp/x.so"}, queue=queue, wait=10)


_SINGLE_GRANTS = [
    [],
    ["--allow-read"],
    ["--allow-read=/etc,/var/tmp"],
    ["--allow-write"],
    ["--allow-write=/var/tmp"],
    ["--allow-net"],
    ["--allow-net=example.com,127.0.0.1:9,*.example.org"],
    ["--allow-env"],
    ["--allow-env=LANG"],
    ["--allow-run"],
    ["--allow-run=ls,cat"],
    ["--allow-sys"],
    ["--allow-ffi"],
    ["--allow-hrtime"],
    ["-A"],
]


@pytest.mark.parametrize(
    "flags",
    _SINGLE_GRANTS
    + [[*g, "--allow-read"] for g in _SINGLE_GRANTS[3:] if g != ["--allow-run=ls,cat"]]
    + [[*g, "--allow-write"] for g in _SINGLE_GRANTS[1:3] + _SINGLE_GRANTS[5:]],
    ids=lambda flags: " ".join(flags) or "none",
)
def test_every_grant_and_pair_starts_the_sandbox(launcher: Launcher, flags: list[str]) -> None:
    """Each form bwrap must set up (mount points in read-only places, sockets, filters)."""
    assert result(launcher, "echo", {"f": flags}, flags) == {"echo": {"f": flags}}
