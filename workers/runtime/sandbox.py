"""Run Bun inside a bubblewrap sandbox that grants exactly what `runtime.permissions` lists.

Compozy's permissions are Deno flags that Bun ignores; here they are enforced (the
permissions table of docs/security/sandbox.md and docs/security/threat-model.md say how,
and which test proves each line).
Deny by default: the project directory read-only, a private /tmp of its own (a tmpfs of
``max_tmp_mb``; TMPDIR is /tmp/toolq inside it), no network, no worker variables, no
executables but Bun, a private /proc; nothing else of the host filesystem but the few
libraries Bun links against.

Who the tool is: never root. A worker running as root starts bwrap as uid/gid 65534
(nobody) on the host, so even under ``--allow-read`` root-only files such as
/etc/shadow stay unreadable (a uid mapped inside a user namespace alone would still be
host root to the filesystem); bwrap then maps that uid into a user namespace of its
own. A worker that is not root runs bwrap as itself, mapped to 65534 inside. bwrap
sets no-new-privileges, drops every capability and loads the seccomp filter of
:mod:`toolq.workers.seccomp` before it executes Bun; nested user namespaces are
disabled.

The sandbox runs in a PID namespace of its own, whose init is bwrap: when the sandbox
ends, everything a tool started in it ends too, even what escaped its process group.
bwrap and Bun share one process group, so the runner's SIGTERM/SIGKILL of the group
reaches Bun as it does unsandboxed (Bun is not PID 1, which would ignore SIGTERM).

Over 400 lines on purpose: the bwrap command line and the checks of what it may cover
(grants, host paths, libraries) change together: a mount added without its check is a hole.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from toolq.errors import ConfigError
from toolq.permissions import Permissions
from toolq.workers.runtime.hidden import HostSockets, hidden_dirs, resolver_files
from toolq.workers.runtime.seccomp import (
    filter_fd,
    no_exec_filter,
    sandbox_filter,
    seccomp_syscall_number,
)
from toolq.workers.runtime.workspace import linked_packages

__all__ = ["Permissions", "Sandbox", "make_sandbox"]

log = logging.getLogger("toolq.worker")

SandboxMode = Literal["required", "auto", "off"]
SANDBOX_TMP = "/tmp/toolq"
"""TMPDIR inside the sandbox: a directory in the sandbox's own size-capped /tmp tmpfs."""
EGRESS_DIR = "/tmp/.toolq-egress"
"""Where the egress proxy's socket appears inside the sandbox (scoped --allow-net): in the
sandbox's own /tmp, since under --allow-read the host's / (and /run) is read-only and
bwrap could not make a mount point there. Bound read-only: a tool cannot replace it."""
TOOL_UID = 65534
"""The uid and gid a tool runs as, inside the sandbox and (for a root worker) on the host."""
DEFAULT_TMP_MB = 64
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
    "bubblewrap) and allow unprivileged user namespaces, or set runtime.sandbox: auto|off"
)
USERNS_HINT = (
    "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
    "user.max_user_namespaces > 0; in a container: --security-opt seccomp=unconfined or a "
    "privileged container), or set runtime.sandbox: off"
)


NETSHIM = Path(__file__).resolve().with_name("netshim.so")


def netshim() -> Path | None:
    """The built network shim (``make setup`` compiles workers/runtime/netshim.c)."""
    return NETSHIM if NETSHIM.is_file() else None


def host_uid() -> int | None:
    """The host uid to start bwrap as: 65534 for a root worker, None (itself) otherwise."""
    return TOOL_UID if os.geteuid() == 0 else None


class Sandbox:
    """Builds bwrap command lines; :meth:`probe` checks once that they work here."""

    def __init__(
        self,
        bwrap: str,
        bun: Path,
        wrapper: Path,
        project_dir: Path,
        entrypoint: Path,
        *,
        unsafe_share_host_network: bool = False,
    ) -> None:
        self.bwrap = bwrap
        self.netshim = netshim()
        """The preloaded route for raw TCP sockets (None: not built, they have no route)."""
        self.unsafe_share_host_network = unsafe_share_host_network
        """Unscoped --allow-net as the host's own network (the operator's opt-in to the
        risk: the worker's Redis, loopback services and cloud metadata in reach)."""
        self.bun = bun.resolve()
        self.wrapper = wrapper
        self.project_dir = project_dir
        self.entrypoint_dir = entrypoint.resolve().parent
        self.linked_packages = linked_packages(project_dir)
        """Workspace packages node_modules links to from outside the project."""
        self._libraries = _shared_libraries(self.bun)
        self.run_as = host_uid()
        """The host uid bwrap is started as (None: the worker's own)."""
        worker_uid = None if self.run_as is not None else os.geteuid()
        self.hidden_dirs = hidden_dirs(worker_uid, os.environ.get("HOME"))
        """Empty under --allow-read: /run, and a non-root worker's own (:mod:`.hidden`)."""
        self._resolver_files = resolver_files()
        self._host_sockets = HostSockets(self.hidden_dirs)
        self.hide_files: tuple[str, ...] = ()
        """Host files never in a tool's view (the worker's secret_key_file), set by the
        worker's assembly: /dev/null where they would be seen."""
        self.filter = sandbox_filter()
        self._no_exec = f"--toolq-no-exec={seccomp_syscall_number()}:{no_exec_filter().hex()}"

    def seccomp_fd(self) -> int:
        """A fresh fd holding the filter, for one launch (the caller closes it)."""
        return filter_fd(self.filter)

    def wrapper_options(self, permissions: Permissions) -> list[str]:
        """What the wrapper sets up before the tool's module loads."""
        options = [] if permissions.run else [self._no_exec]
        if self.uses_egress(permissions):
            options.append(f"--toolq-egress={EGRESS_DIR}/egress.sock")
        return options

    def uses_egress(self, permissions: Permissions) -> bool:
        """Whether the network goes through the egress proxy: every `--allow-net` grant,
        unless the operator shares the host's network for unscoped ones."""
        if permissions.net is True:
            return not self.unsafe_share_host_network
        return bool(permissions.net)

    def command(
        self,
        permissions: Permissions,
        argv: list[str],
        *,
        tmp_mb: int = DEFAULT_TMP_MB,
        seccomp_fd: int | None = None,
        egress_dir: str | None = None,
    ) -> list[str]:
        """``argv`` (starting with Bun) wrapped in bwrap."""
        uid = str(TOOL_UID)
        args = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
        args += ["--uid", uid, "--gid", uid, "--cap-drop", "ALL"]
        if permissions.net is True and self.unsafe_share_host_network:
            args.append("--share-net")
        if permissions.read is True:
            args += ["--ro-bind", "/", "/"]  # Bun, its libraries and programs are in there
            args += self._hide(permissions)
        elif permissions.run is True:
            args += ["--ro-bind", "/usr", "/usr"]  # programs and every library they need
            for name in ("bin", "sbin", "lib", "lib64"):
                target = Path("/") / name
                if target.is_symlink():
                    args += ["--symlink", os.readlink(target), f"/{name}"]
                elif target.is_dir():
                    args += ["--ro-bind", str(target), f"/{name}"]
        if permissions.read is not True and permissions.run is not True:
            bound = set()
            for real, seen_as in self._libraries + _programs(permissions.run):
                if seen_as not in bound:
                    bound.add(seen_as)
                    args += ["--ro-bind", real, seen_as]
        # /tmp is a small tmpfs of the sandbox's own, made first: Bun, the project or a
        # granted path under /tmp (a checkout in /tmp, say) are bound onto it, and their
        # mount points never land in a host directory. TMPDIR is a directory in it: its
        # size is capped and it is gone when the sandbox ends.
        # /dev is bwrap's own tmpfs, unbounded: read-only, so that /tmp (capped) and the
        # granted paths are the only places a tool can write (device nodes still work).
        args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
        args += ["--size", str(tmp_mb * 2**20), "--tmpfs", "/tmp", "--dir", SANDBOX_TMP]
        args += ["--ro-bind", str(self.bun), str(self.bun)]
        project = str(self.project_dir)
        args += ["--bind" if permissions.write is True else "--ro-bind", project, project]
        if not self.entrypoint_dir.is_relative_to(self.project_dir):
            args += ["--ro-bind", str(self.entrypoint_dir), str(self.entrypoint_dir)]
        for package in self.linked_packages:  # workspace:* dependencies
            args += ["--ro-bind", package, package]
        for script in (self.wrapper, self.wrapper.with_name("no_ffi.ts")):
            args += ["--ro-bind", str(script), str(script)]
        if isinstance(permissions.read, tuple):
            for path in permissions.read:
                args += ["--ro-bind-try", path, path]
        if isinstance(permissions.write, tuple):
            for path in permissions.write:
                args += ["--bind-try", path, path]
        if permissions.sys:
            args += ["--ro-bind", "/sys", "/sys"]
        elif permissions.read is True:  # the host's /sys came with /: hide it again
            args += ["--tmpfs", "/sys", "--remount-ro", "/sys"]
        if egress_dir is not None:
            args += ["--ro-bind", egress_dir, EGRESS_DIR]
            if self.netshim is not None:  # raw TCP through the proxy too (netshim.c)
                shim = str(self.netshim)
                args += ["--ro-bind", shim, shim, "--setenv", "LD_PRELOAD", shim]
        if permissions.read is not True:
            args += ["--remount-ro", "/"]
        args += self._cover(permissions)
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        args += ["--chdir", project, "--"]
        return args + argv

    def _hide(self, permissions: Permissions) -> list[str]:
        """Under --allow-read, right after the host's /: an empty tmpfs on each hidden
        directory (what is bound later, the project say, still gets its mount point)."""
        args = []
        for path in self.hidden_dirs:
            args += ["--tmpfs", path]
        for path in self._resolver_files:
            args += ["--ro-bind", path, path]
        return args

    def _cover(self, permissions: Permissions) -> list[str]:
        """Last: hidden directories read-only, /dev/null over the host's unix sockets
        (broad --allow-read) and over ``hide_files`` wherever they would be seen."""
        args = []
        if permissions.read is True:
            for path in self.hidden_dirs:
                args += ["--remount-ro", path]
        bound = [
            os.path.realpath(self.project_dir)
        ]  # bound after the hiding: seen even in a hidden dir
        granted = [
            path
            for grant in (permissions.read, permissions.write)
            if isinstance(grant, tuple)
            for path in grant
        ]
        covered = [(os.path.realpath(path), [*bound, *granted]) for path in self.hide_files]
        if permissions.read is True:  # a grant that names a socket's path shows it
            covered += [(path, bound) for path in self._host_sockets.paths()]
        for path, roots in covered:
            hidden = any(_within(path, directory) for directory in self.hidden_dirs)
            if any(_within(path, root) for root in roots) or (
                permissions.read is True and not hidden
            ):
                args += ["--ro-bind-try", "/dev/null", path]
        return args

    def access_problem(self) -> str | None:
        """Why the tools' uid cannot reach Bun, the wrapper or the project (a root worker
        runs tools as uid 65534), with the exact chmod that fixes it; None if it can."""
        if self.run_as is None:
            return None
        needed = [
            (self.bun, os.R_OK | os.X_OK),
            (self.wrapper, os.R_OK),
            (self.wrapper.with_name("no_ffi.ts"), os.R_OK),
            (self.project_dir, os.R_OK | os.X_OK),
            (self.entrypoint_dir, os.R_OK | os.X_OK),
        ]
        for path, mode in needed:
            fix = access_fix(path, mode)
            if fix is not None:
                verb = "run" if path == self.bun else "read"
                return (
                    f"the tools' uid {self.run_as} cannot {verb} {path} (a root worker runs "
                    f"tools as uid {self.run_as}, which is neither owner nor group): {fix}"
                )
        return None

    def grant_problems(self, permissions: Permissions) -> tuple[list[str], list[str]]:
        """Each ``--allow-read=PATH`` / ``--allow-write=PATH`` the tools' uid cannot use
        here, said with the fix: (paths whose mode bars that uid, missing paths)."""
        barred: list[str] = []
        missing: list[str] = []
        for flag, paths, mode in (
            ("--allow-read", permissions.read, os.R_OK),
            ("--allow-write", permissions.write, os.W_OK),
        ):
            for path in paths if isinstance(paths, tuple) else ():
                if not Path(path).exists():
                    missing.append(f"{flag}={path}: does not exist on this worker")
                    continue
                problem = self._grant_problem(Path(path), mode)
                if problem is not None:
                    barred.append(f"{flag}={path}: {problem}")
        return barred, missing

    def _grant_problem(self, path: Path, mode: int) -> str | None:
        needed = mode | (os.X_OK if path.is_dir() else 0)
        verb = "write" if mode == os.W_OK else "read"
        if self.run_as is None:  # bwrap runs as this worker's own uid
            if os.access(path, needed):
                return None
            return f"this worker's uid {os.geteuid()}, which its tools run as, cannot {verb} it"
        fix = access_fix(path, needed)
        if fix is None:
            return None
        return f"the tools' uid {self.run_as} cannot {verb} it: {fix}"

    def probe(self) -> str | None:
        """None if a sandboxed Bun runs here, else why not (:meth:`access_problem` first)."""
        problem = self.access_problem()
        if problem is not None:
            return problem
        fd = self.seccomp_fd()
        uid = self.run_as
        try:
            proc = subprocess.run(
                self.command(Permissions(), [str(self.bun), "--version"], seccomp_fd=fd),
                capture_output=True,
                text=True,
                timeout=20,
                pass_fds=(fd,),
                user=uid,
                group=uid,
                extra_groups=[] if uid is not None else None,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        finally:
            os.close(fd)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip() or f"bwrap exited {proc.returncode}"
        return None


def make_sandbox(
    mode: SandboxMode,
    bun: Path,
    wrapper: Path,
    project_dir: Path,
    entrypoint: Path | None = None,
    *,
    unsafe_share_host_network: bool = False,
) -> Sandbox | None:
    """The sandbox to use, None when off; `required` refuses to start without one.

    ``auto`` runs tools unsandboxed only when this host cannot sandbox at all (no
    bubblewrap, or bwrap cannot start here: no user namespaces); a path the tools' uid
    cannot read is a fixable mistake, and refuses to start in every mode but ``off``."""
    if mode == "off":
        return None
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        _cannot_sandbox(mode, "bubblewrap (bwrap) is not installed", INSTALL_HINT)
        return None
    sandbox = None
    if bwrap is not None:
        sandbox = Sandbox(
            bwrap,
            bun,
            wrapper,
            project_dir,
            entrypoint or project_dir / "x",
            unsafe_share_host_network=unsafe_share_host_network,
        )
        access = sandbox.access_problem()
        if access is not None:
            raise ConfigError(
                f"tools cannot be sandboxed with this project where it is: {access} "
                f"(runtime.sandbox: {mode} never runs them unsandboxed for this)",
                key="runtime.sandbox",
            )
        problem = sandbox.probe()
    if problem is None:
        return sandbox
    _cannot_sandbox(mode, f"bubblewrap cannot start a sandbox here: {problem}", USERNS_HINT)
    return None


def _cannot_sandbox(mode: SandboxMode, problem: str, hint: str) -> None:
    """This host cannot sandbox: `required` refuses to start, `auto` warns."""
    if mode == "required":
        raise ConfigError(
            f"runtime.sandbox is required but tools cannot be sandboxed here: {problem}; " + hint,
            key="runtime.sandbox",
        )
    log.warning("tools run UNSANDBOXED (runtime.sandbox: auto): %s; %s", problem, hint)


def _tool_bits(st: os.stat_result) -> int:
    """The rwx bits (as "others" bits) the tools' uid gets on a file: its owner's or its
    group's if it is that owner or group (it has no other groups), else others'."""
    if st.st_uid == TOOL_UID:
        return (st.st_mode >> 6) & 0o7
    if st.st_gid == TOOL_UID:
        return (st.st_mode >> 3) & 0o7
    return st.st_mode & 0o7


def access_fix(path: Path, mode: int) -> str | None:
    """The chmod that lets the tools' uid 65534 reach ``path`` with ``mode`` (every parent
    searchable, then the bits ``mode`` needs); None if it may already. Write access is
    better given to uid 65534 alone than to everyone, so the fix for it says how."""
    try:
        target = path.resolve()
        closed = [str(p) for p in reversed(target.parents) if not _tool_bits(os.stat(p)) & 0o1]
        bits = _tool_bits(os.stat(target))
    except OSError as exc:
        return f"cannot inspect it ({exc.strerror})"
    missing = "".join(
        letter
        for flag, bit, letter in (
            (os.R_OK, 0o004, "r"),
            (os.W_OK, 0o002, "w"),
            (os.X_OK, 0o001, "x"),
        )
        if mode & flag and not bits & bit
    )
    fixes = [f"chmod o+x {' '.join(closed)}"] if closed else []
    if "w" in missing:
        fixes.append(f"chown {TOOL_UID} {target} (or setfacl -m u:{TOOL_UID}:rwX {target})")
        missing = missing.replace("w", "")
    if missing:
        letters = "rX" if target.is_dir() and "r" in missing else missing
        fixes.append(f"chmod o+{letters} {target}")
    return " && ".join(fixes) if fixes else None


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=64)
def _programs(run: bool | tuple[str, ...]) -> list[tuple[str, str]]:
    """(real file, path in the sandbox) for each `--allow-run=PROGRAMS` program (found on
    the tools' PATH unless absolute) and the libraries it links; missing ones are left
    out, so starting them fails as "not found". Cached: ldd runs once per grant, not per call."""
    if not isinstance(run, tuple):
        return []
    path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    found: list[tuple[str, str]] = []
    for program in run:
        located = program if program.startswith("/") else shutil.which(program, path=path)
        if located is None or not os.path.isfile(located):
            log.warning("--allow-run: program %s not found on this worker", program)
            continue
        found.append((os.path.realpath(located), os.path.abspath(located)))
        found += _shared_libraries(Path(located))
    return found


def _shared_libraries(binary: Path) -> list[tuple[str, str]]:
    """(real file, path the loader asks for) for every library ``binary`` links against."""
    try:
        out = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    libraries = []
    for line in out.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            path = match.group(1)
            libraries.append((os.path.realpath(path), path))
    return libraries
