"""Start one Bun process running the wrapper: the one place both runtime modes spawn.

It puts together what every Bun process gets: its own process group (so the runner
can signal the whole group), the reaper's watch, the sandbox (bubblewrap) with the
granted permissions, a cgroup with the memory and process limits, rlimits, and an
environment of only PATH, HOME, LANG, TMPDIR and the worker variables `--allow-env`
names. The call's own env never goes into this environment — bwrap and the dynamic
loader would read it (``LD_AUDIT``, ``BUN_OPTIONS``…): it travels in the request and
the wrapper sets it inside the sandbox, for Bun only.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolq.config.loader import ENV_PREFIX
from toolq.permissions import Grant
from toolq.workers.runtime.bun import WRAPPER
from toolq.workers.runtime.compat import compozy_environment
from toolq.workers.runtime.egress import Destinations, EgressProxy, Peers
from toolq.workers.runtime.limits import (
    Cgroup,
    Cgroups,
    ResourceLimits,
    can_join,
    joining,
    main_process,
    pid_alive,
    preexec,
)
from toolq.workers.runtime.reaper import reaper
from toolq.workers.runtime.sandbox import SANDBOX_TMP, Permissions, Sandbox

_BASE_ENV_KEYS = ("PATH", "HOME", "LANG")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


TMP_PREFIX = "toolq-call-"
_TMP_NAME = re.compile(rf"^{TMP_PREFIX}(\d+)-")


def base_environment(allow_env: Grant = False) -> dict[str, str]:
    """The worker variables a tool sees: PATH, HOME, LANG — plus those `--allow-env=NAMES`
    names, or all of them with `--allow-env`. Never the worker's own ``TOOLQ_*`` settings
    (the Redis URL and its password among them), whatever the grant."""
    if allow_env is True:
        return {key: value for key, value in os.environ.items() if not _worker_own(key)}
    env = {key: os.environ[key] for key in _BASE_ENV_KEYS if key in os.environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    for name in allow_env or ():
        if name in os.environ and not _worker_own(name):
            env[name] = os.environ[name]
    return env


def _worker_own(name: str) -> bool:
    return name.upper().startswith(ENV_PREFIX)


def call_tmpdir() -> str:
    """A private host directory for one call or warm process, named after this worker's
    pid so that :func:`sweep_tmpdirs` can tell a dead worker's leftovers. Only an
    unsandboxed tool uses it as TMPDIR (a sandboxed one has a capped tmpfs)."""
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")


def _tool_tmpdir(host_tmpdir: str | None) -> str:
    return SANDBOX_TMP if host_tmpdir is None else host_tmpdir


def sweep_tmpdirs(root: str | None = None) -> list[str]:
    """Remove the temp directories of workers that are gone (killed before cleaning up)."""
    root = root or tempfile.gettempdir()
    removed = []
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for entry in entries:
            match = _TMP_NAME.match(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            if pid_alive(int(match.group(1))):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


@dataclass
class Launched:
    """A running Bun process and what belongs to it."""

    proc: subprocess.Popen[bytes]
    envelope_fd: int
    cgroup: Cgroup | None
    sandboxed: bool
    limits: ResourceLimits
    tmpdir: str | None = None
    """Its private host TMPDIR (unsandboxed only: a sandboxed process has a capped tmpfs
    of its own); removed with the process, as its cgroup is."""
    peers: Peers | None = None
    """The egress proxies' record of launched processes (sandboxed only)."""
    _bun_pid: int | None = None
    _oom_killed: bool | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def tool_tmpdir(self) -> str:
        """TMPDIR as the tool sees it."""
        return _tool_tmpdir(self.tmpdir)

    @property
    def bun_pid(self) -> int:
        """Bun's own host pid (below bwrap when sandboxed); bwrap's until Bun has started."""
        if self._bun_pid is None:
            self._bun_pid = main_process(self.proc.pid, self.sandboxed)
        return self._bun_pid if self._bun_pid is not None else self.proc.pid

    @property
    def bun_started(self) -> bool:
        return self.bun_pid != self.proc.pid or not self.sandboxed

    def returncode(self) -> int | None:
        """Exit status as Popen reports it; bwrap's 128+N becomes the signal N."""
        code = self.proc.returncode
        if self.sandboxed and code is not None and code > 128:
            return -(code - 128)
        return code

    def memory_exceeded(self) -> bool:
        if self._oom_killed is not None:  # stopped: read before the cgroup went away
            return self._oom_killed
        return self.cgroup is not None and self.cgroup.oom_killed()

    def end_call(self) -> None:
        """A call on this process is over: close the network connections it left open."""
        if self.peers is not None:
            self.peers.end_call(self.proc.pid)

    def stop(self) -> None:
        """SIGKILL the whole group, reap, release pipes, the cgroup and the TMPDIR."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        reaper().untrack(self.proc.pid)
        if self.peers is not None:
            self.peers.remove(self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            os.close(self.envelope_fd)
        if self.cgroup is not None:
            self._oom_killed = self.cgroup.oom_killed()
            self.cgroup.remove()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


START_WAIT_S = 30.0
"""How long a runtime's close() waits for a process still being started, to kill it."""


class Starters:
    """A runtime's threads that start processes in the background, so that its close()
    can wait for them (each kills what it started once it sees the runtime closed).

    ``start`` and ``done`` are called with the runtime's lock held, ``done`` in the same
    locked section where the starter checks whether the runtime closed: a starter either
    hands its process over before close() or is among those close() waits for.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._threads: set[threading.Thread] = set()

    def start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=self._name, daemon=True)
        self._threads.add(thread)
        thread.start()

    def done(self) -> None:
        """Called by the starting thread itself."""
        self._threads.discard(threading.current_thread())

    def running(self) -> list[threading.Thread]:
        return list(self._threads)

    @staticmethod
    def wait(threads: list[threading.Thread]) -> None:
        """Outside the runtime's lock: the starters need it to finish."""
        for thread in threads:
            thread.join(timeout=START_WAIT_S)


class Launcher:
    def __init__(
        self,
        bun: Path,
        entrypoint: Path,
        project_dir: Path,
        *,
        sandbox: Sandbox | None = None,
        cgroups: Cgroups | None = None,
        destinations: Destinations | None = None,
    ) -> None:
        """``destinations``: what the egress proxies let tools reach (the worker's Redis
        endpoints among what they never do)."""
        self.bun = bun
        self.entrypoint = entrypoint
        self.project_dir = project_dir
        self.sandbox = sandbox
        self.cgroups = cgroups
        self.destinations = destinations or Destinations()
        self.peers = Peers()
        self._egress: dict[tuple[str, ...], EgressProxy] = {}
        self._egress_lock = threading.Lock()
        sweep_tmpdirs()
        if cgroups is not None:
            cgroups.sweep()

    def _egress_dir(self, permissions: Permissions) -> str | None:
        """The host directory of the egress proxy for this `--allow-net` grant (one proxy
        per set of rules; unscoped: the public network)."""
        if self.sandbox is None or not self.sandbox.uses_egress(permissions):
            return None
        rules = permissions.net_rules if isinstance(permissions.net, tuple) else None
        key = ("*",) if rules is None else tuple(sorted(str(rule) for rule in rules))
        with self._egress_lock:
            proxy = self._egress.get(key)
            if proxy is None or proxy.pid != os.getpid():  # a forked pool process: its own
                proxy = EgressProxy(rules, self.destinations, self.peers)
                self._egress[key] = proxy
        return proxy.directory

    def launch(
        self,
        *,
        permissions: Permissions,
        limits: ResourceLimits,
        env: dict[str, str],
        warm: bool,
        check: bool = False,
    ) -> Launched:
        """Start Bun on the wrapper (``check``: only load the entrypoint, then exit); raises
        OSError if it cannot start. Unsandboxed, it gets a private host TMPDIR (a sandboxed
        one has its tmpfs: making and removing an unused directory per spawned process cost
        a mkdir and an rmtree each)."""
        tmpdir = call_tmpdir() if self.sandbox is None else None
        try:
            return self._launch(tmpdir, permissions, limits, env, warm=warm, check=check)
        except OSError:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise

    def _launch(
        self,
        tmpdir: str | None,
        permissions: Permissions,
        limits: ResourceLimits,
        env: dict[str, str],
        *,
        warm: bool,
        check: bool,
    ) -> Launched:
        envelope_r, envelope_w = os.pipe()
        fds = [envelope_w]
        argv = [
            str(self.bun),
            "--smol",
            "--no-install",
            "--no-env-file",
            str(WRAPPER),
            str(self.entrypoint),
            str(envelope_w),
        ]
        argv.append("warm" if warm else "check" if check else "spawn")
        if not permissions.ffi:
            argv.append("--toolq-no-ffi")
        uid = None
        if self.sandbox is not None:
            argv += self.sandbox.wrapper_options(permissions)
            seccomp = self.sandbox.seccomp_fd()
            fds.append(seccomp)
            argv = self.sandbox.command(
                permissions,
                argv,
                tmp_mb=limits.max_tmp_mb,
                seccomp_fd=seccomp,
                egress_dir=self._egress_dir(permissions),
            )
            uid = self.sandbox.run_as
        try:
            cgroup = self.cgroups.create(limits) if self.cgroups is not None else None
        except OSError:
            for fd in (envelope_r, *fds):
                os.close(fd)
            raise
        preexec_fn = None
        if cgroup is not None and can_join(uid):
            argv = joining(cgroup, limits, argv, uid)  # cgjoin or a shell: subprocess keeps vfork
        elif cgroup is not None:
            preexec_fn = preexec(cgroup, limits, uid)  # no setpriv here: Python does it
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=tuple(fds),
                cwd=self.project_dir,
                env={
                    **env,
                    "TMPDIR": _tool_tmpdir(tmpdir),
                    **compozy_environment(self.project_dir),
                },
                start_new_session=True,
                # Joining the cgroup happens in the child, before bwrap or Bun can fork, and
                # before it drops to the tools' uid (the joining shell, or preexec_fn).
                preexec_fn=preexec_fn,
                user=uid if cgroup is None else None,
                group=uid if cgroup is None else None,
                extra_groups=[] if cgroup is None and uid is not None else None,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(envelope_r)
            if cgroup is not None:
                cgroup.remove()
            raise OSError(f"cannot start Bun ({self.bun}): {exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)
        reaper().track(proc.pid)
        sandboxed = self.sandbox is not None
        if sandboxed:
            self.peers.add(proc.pid)  # before Bun can connect to an egress proxy
        if cgroup is None:
            with contextlib.suppress(OSError):
                nofile = limits.max_open_files
                resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
        return Launched(
            proc, envelope_r, cgroup, sandboxed, limits, tmpdir, self.peers if sandboxed else None
        )
