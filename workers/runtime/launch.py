"""Start one Bun process running the wrapper: the one place both runtime modes spawn.

It puts together what every Bun process gets: its own process group (so the runner
can signal the whole group), the reaper's watch, the sandbox (bubblewrap) with the
granted permissions, a cgroup with the memory and process limits, rlimits, and an
environment of only PATH, HOME, LANG, TMPDIR and what the call passes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from toolq.workers.runtime.bun import WRAPPER
from toolq.workers.runtime.limits import Cgroup, Cgroups, ResourceLimits, joining, main_process
from toolq.workers.runtime.reaper import reaper
from toolq.workers.runtime.sandbox import SANDBOX_TMP, Permissions, Sandbox

_BASE_ENV_KEYS = ("PATH", "HOME", "LANG")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def base_environment(allow_env: bool = False) -> dict[str, str]:
    """The worker variables a tool sees: PATH, HOME, LANG — or all with --allow-env."""
    if allow_env:
        return dict(os.environ)
    env = {key: os.environ[key] for key in _BASE_ENV_KEYS if key in os.environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    return env


@dataclass
class Launched:
    """A running Bun process and what belongs to it."""

    proc: subprocess.Popen[bytes]
    envelope_fd: int
    cgroup: Cgroup | None
    sandboxed: bool
    limits: ResourceLimits
    _bun_pid: int | None = None
    _oom_killed: bool | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

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

    def stop(self) -> None:
        """SIGKILL the whole group, reap, release pipes and the cgroup."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        reaper().untrack(self.proc.pid)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            os.close(self.envelope_fd)
        if self.cgroup is not None:
            self._oom_killed = self.cgroup.oom_killed()
            self.cgroup.remove()


class Launcher:
    def __init__(
        self,
        bun: Path,
        entrypoint: Path,
        project_dir: Path,
        *,
        sandbox: Sandbox | None = None,
        cgroups: Cgroups | None = None,
    ) -> None:
        self.bun = bun
        self.entrypoint = entrypoint
        self.project_dir = project_dir
        self.sandbox = sandbox
        self.cgroups = cgroups

    def tmp_path(self, host_tmpdir: str) -> str:
        """TMPDIR as the tool sees it."""
        return SANDBOX_TMP if self.sandbox is not None else host_tmpdir

    def launch(
        self,
        *,
        tmpdir: str,
        permissions: Permissions,
        limits: ResourceLimits,
        env: dict[str, str],
        warm: bool,
    ) -> Launched:
        """Start Bun on the wrapper; raises OSError if it cannot be started."""
        envelope_r, envelope_w = os.pipe()
        argv = [
            str(self.bun),
            "--smol",
            "--no-install",
            "--no-env-file",
            str(WRAPPER),
            str(self.entrypoint),
            str(envelope_w),
        ]
        if warm:
            argv.append("warm")
        if self.sandbox is not None:
            argv = self.sandbox.command(permissions, tmpdir, argv)
        cgroup = self.cgroups.create(limits) if self.cgroups is not None else None
        if cgroup is not None:
            argv = joining(cgroup, limits, argv)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(envelope_w,),
                cwd=self.project_dir,
                env={**env, "TMPDIR": self.tmp_path(tmpdir)},
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(envelope_r)
            if cgroup is not None:
                cgroup.remove()
            raise OSError(f"cannot start Bun ({self.bun}): {exc}") from exc
        finally:
            os.close(envelope_w)
        reaper().track(proc.pid)
        if cgroup is None:
            with contextlib.suppress(OSError):
                nofile = limits.max_open_files
                resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
        return Launched(proc, envelope_r, cgroup, self.sandbox is not None, limits)
