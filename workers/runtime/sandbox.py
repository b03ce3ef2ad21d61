"""Run Bun inside a bubblewrap sandbox that grants what `runtime.permissions` lists.

Compozy's permissions are Deno flags that Bun ignores; here they are enforced.
Deny by default: the project directory read-only, a private empty /tmp (a 64 MiB
tmpfs; TMPDIR is a host directory toolq empties after each call), no network, only
the env the call passes, no executables but Bun, a private /proc; nothing else of
the host filesystem but the few libraries Bun links against.

| flag | grants |
|---|---|
| `--allow-read` / `--allow-read=a,b` | the host filesystem read-only / only those paths |
| `--allow-write` / `--allow-write=a,b` | the project directory writable / only those paths |
| `--allow-net` | the host's network (all or nothing) |
| `--allow-env` | the worker's environment |
| `--allow-run` | other programs (/usr, /bin) |
| `--allow-sys` | /sys |

The sandbox runs with every capability dropped (as root, a user namespace alone would
still let a tool remount its binds writable) in a PID namespace of its own, whose
init is bwrap: when the sandbox ends, everything a tool started in it ends too, even
what escaped its process group. bwrap and Bun share one process group, so the
runner's SIGTERM/SIGKILL of the group reaches Bun as it does unsandboxed (Bun is not
PID 1, which would ignore SIGTERM).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from toolq.errors import ConfigError

log = logging.getLogger("toolq.worker")

SandboxMode = Literal["required", "auto", "off"]
SANDBOX_TMP = "/tmp/toolq"
"""TMPDIR inside the sandbox: the call's private host directory, bound onto /tmp's tmpfs."""
TMPFS_BYTES = 64 * 1024 * 1024
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
    "bubblewrap) and allow unprivileged user namespaces, or set runtime.sandbox: auto|off"
)


@dataclass(frozen=True)
class Permissions:
    """Parsed `--allow-*` flags. A path list grants only those paths; True grants all."""

    read: bool | tuple[str, ...] = False
    write: bool | tuple[str, ...] = False
    net: bool = False
    env: bool = False
    run: bool = False
    sys: bool = False

    @classmethod
    def parse(cls, flags: list[str]) -> Permissions:
        grants: dict[str, bool | tuple[str, ...]] = {}
        for flag in flags:
            name, _, value = flag.partition("=")
            key = name.removeprefix("--allow-")
            paths = tuple(p for p in value.split(",") if p) if value else ()
            grants[key] = paths if paths and key in ("read", "write") else True
        return cls(**grants)  # type: ignore[arg-type]


class Sandbox:
    """Builds bwrap command lines; :meth:`probe` checks once that they work here."""

    def __init__(
        self, bwrap: str, bun: Path, wrapper: Path, project_dir: Path, entrypoint: Path
    ) -> None:
        self.bwrap = bwrap
        self.bun = bun.resolve()
        self.wrapper = wrapper
        self.project_dir = project_dir
        self.entrypoint_dir = entrypoint.resolve().parent
        self._libraries = _shared_libraries(self.bun)

    def command(self, permissions: Permissions, tmpdir: str, argv: list[str]) -> list[str]:
        """``argv`` (starting with Bun) wrapped in bwrap, with ``tmpdir`` as its /tmp."""
        args = [self.bwrap, "--unshare-all", "--cap-drop", "ALL"]
        if permissions.net:
            args.append("--share-net")
        if permissions.read is True:
            args += ["--ro-bind", "/", "/"]  # Bun, its libraries and programs are in there
        elif permissions.run:
            args += ["--ro-bind", "/usr", "/usr"]  # programs and every library they need
            for name in ("bin", "sbin", "lib", "lib64"):
                target = Path("/") / name
                if target.is_symlink():
                    args += ["--symlink", os.readlink(target), f"/{name}"]
                elif target.is_dir():
                    args += ["--ro-bind", str(target), f"/{name}"]
        if permissions.read is not True and not permissions.run:
            for real, seen_as in self._libraries:
                args += ["--ro-bind", real, seen_as]
        # /tmp is a small tmpfs of the sandbox's own, made first: Bun, the project or a
        # granted path under /tmp (a checkout in /tmp, say) are bound onto it, and their
        # mount points never land in a host directory. TMPDIR is the call's private host
        # directory, bound inside it (the runner empties or removes it after the call).
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(TMPFS_BYTES),
            "--tmpfs",
            "/tmp",
            "--bind",
            tmpdir,
            SANDBOX_TMP,
        ]
        args += ["--ro-bind", str(self.bun), str(self.bun)]
        project = str(self.project_dir)
        args += ["--bind" if permissions.write is True else "--ro-bind", project, project]
        if not self.entrypoint_dir.is_relative_to(self.project_dir):
            args += ["--ro-bind", str(self.entrypoint_dir), str(self.entrypoint_dir)]
        args += ["--ro-bind", str(self.wrapper), str(self.wrapper)]
        if isinstance(permissions.read, tuple):
            for path in permissions.read:
                args += ["--ro-bind-try", path, path]
        if isinstance(permissions.write, tuple):
            for path in permissions.write:
                args += ["--bind-try", path, path]
        if permissions.sys:
            args += ["--ro-bind", "/sys", "/sys"]
        if permissions.read is not True:
            args += ["--remount-ro", "/"]
        args += ["--chdir", project, "--"]
        return args + argv

    def probe(self) -> str | None:
        """None if a sandboxed Bun runs here, else why not."""
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        try:
            proc = subprocess.run(
                self.command(Permissions(), str(tmp), [str(self.bun), "--version"]),
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip() or f"bwrap exited {proc.returncode}"
        return None


def make_sandbox(
    mode: SandboxMode,
    bun: Path,
    wrapper: Path,
    project_dir: Path,
    entrypoint: Path | None = None,
) -> Sandbox | None:
    """The sandbox to use, None when off; `required` refuses to start without one."""
    if mode == "off":
        return None
    bwrap = shutil.which("bwrap")
    problem = "bubblewrap (bwrap) is not installed" if bwrap is None else None
    sandbox = None
    if bwrap is not None:
        sandbox = Sandbox(bwrap, bun, wrapper, project_dir, entrypoint or project_dir / "x")
        problem = sandbox.probe()
    if problem is None:
        return sandbox
    if mode == "required":
        raise ConfigError(
            f"runtime.sandbox is required but tools cannot be sandboxed here: {problem}; "
            + INSTALL_HINT,
            key="runtime.sandbox",
        )
    log.warning("tools run UNSANDBOXED (runtime.sandbox: auto): %s; %s", problem, INSTALL_HINT)
    return None


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
