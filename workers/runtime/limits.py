"""Per-process resource limits for Bun: memory, processes, open files, CPU time.

Bun reserves a lot of virtual memory, so RLIMIT_AS cannot bound it. Memory and the
number of processes are bounded with a cgroup per Bun process (v2, or v1's memory and
pids hierarchies), created under the worker's own cgroup so its limits still apply;
the kernel kills a tool that passes ``max_memory_mb`` and the runner reports
``memory_exceeded``. Where no cgroup can be made, the runner watches the process's
RSS instead. Open files are an rlimit; CPU time is watched per call (a warm process
serves many calls, so an rlimit would add them up).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import queue
import re
import resource
import shlex
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("toolq.worker")
ROOT = Path("/sys/fs/cgroup")
_NAME = re.compile(r"^toolq-(\d+)-[0-9a-f]{8}$")
"""A per-process cgroup's name: the worker's pid, then a random part (:meth:`Cgroups.create`)."""


@dataclass(frozen=True)
class ResourceLimits:
    max_memory_mb: int
    max_processes: int
    max_open_files: int
    max_cpu_time_s: float | None
    max_tmp_mb: int = 64
    """Size of the sandbox's /tmp tmpfs (TMPDIR is in it)."""


class Cgroup:
    """One Bun process's cgroup (one directory per hierarchy)."""

    def __init__(self, dirs: dict[str, Path], version: int) -> None:
        self.dirs = dirs
        self.version = version

    def procs_files(self) -> list[str]:
        return [str(path / "cgroup.procs") for path in self.dirs.values()]

    @functools.cached_property
    def first_procs_file(self) -> str:
        """Any hierarchy lists every process of the cgroup (read after every warm call:
        the path is built once)."""
        return self.procs_files()[0]

    def oom_killed(self) -> bool:
        """Did the kernel kill a process here for passing the memory limit?"""
        memory = self.dirs.get("memory")
        if memory is None:
            return False
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        with contextlib.suppress(OSError, ValueError):
            for line in (memory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        return False

    def remove(self) -> None:
        """Remove the cgroup; one whose killed processes are still exiting (busy) is
        removed by :func:`remove_when_empty` as soon as they are gone."""
        for path in self.dirs.values():
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                remove_when_empty(path)


REMOVE_RETRY_S = 0.05
REMOVE_GIVE_UP_S = 60.0
"""How long a busy cgroup is tried again before it is left (and logged)."""
EXIT_WAIT_S = 10.0
"""How long an exiting worker waits for its busy cgroups to empty (its last killed Bun
processes exiting): the remover is a daemon thread, so without this wait a worker
stopped by SIGTERM left a cgroup behind about every time."""
_leftovers: queue.SimpleQueue[tuple[Path, float]] = queue.SimpleQueue()
_remover: tuple[int, threading.Thread] | None = None
_remover_lock = threading.Lock()
_outstanding = threading.Condition()
_pending: dict[int, int] = {}
"""pid -> busy cgroups not yet removed nor given up, for the exit wait (per process: a
forked pool child inherits the parent's count, not its thread)."""


def remove_when_empty(path: Path) -> None:
    """Remove ``path`` (a cgroup) once its processes are gone, on a background thread.

    ``rmdir`` fails while a process killed a moment ago is still exiting (a Bun with
    many threads, the sandbox's PID namespace coming down); silently leaving the cgroup
    kept about half the spawned processes' cgroups for good, and a cgroup-v1 memory
    cgroup holds kernel memory and one of the 65,535 ids the kernel hands out.
    """
    global _remover
    with _outstanding:
        _pending[os.getpid()] = _pending.get(os.getpid(), 0) + 1
    _leftovers.put((path, time.monotonic() + REMOVE_GIVE_UP_S))
    with _remover_lock:
        if _remover is None or _remover[0] != os.getpid() or not _remover[1].is_alive():
            thread = threading.Thread(target=_remove_leftovers, name="toolq-cgroups", daemon=True)
            thread.start()
            _remover = (os.getpid(), thread)


def _settled() -> None:
    with _outstanding:
        _pending[os.getpid()] = max(0, _pending.get(os.getpid(), 0) - 1)
        _outstanding.notify_all()


def wait_for_leftovers(timeout_s: float = EXIT_WAIT_S) -> bool:
    """Wait until this process's busy cgroups are removed (or given up); True if none is
    left. Runs at exit (atexit), so a stopped worker leaves none behind."""
    deadline = time.monotonic() + timeout_s
    with _outstanding:
        while _pending.get(os.getpid(), 0) > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _outstanding.wait(left)
    return True


atexit.register(wait_for_leftovers)


def _remove_leftovers() -> None:
    waiting: list[tuple[Path, float]] = []
    while True:
        try:
            waiting.append(_leftovers.get(timeout=REMOVE_RETRY_S if waiting else None))
            while True:
                waiting.append(_leftovers.get_nowait())
        except queue.Empty:
            pass
        still = []
        for path, give_up_at in waiting:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if time.monotonic() < give_up_at:
                    still.append((path, give_up_at))
                    continue
                log.warning("cannot remove the cgroup %s: %s", path, exc)
            _settled()
        waiting = still  # tried again when the next arrives, or after REMOVE_RETRY_S


class Cgroups:
    """Makes per-process cgroups, if this machine lets the worker."""

    def __init__(self, version: int, parents: dict[str, Path]) -> None:
        self.version = version
        self.parents = parents

    @classmethod
    def detect(cls) -> Cgroups | None:
        own = _own_cgroups()
        unified = ROOT / "cgroup.controllers"
        if unified.exists():
            controllers = unified.read_text().split()
            if {"memory", "pids"} <= set(controllers):
                parent = ROOT / own.get("", "/").lstrip("/")
                candidate = cls(2, {"memory": parent, "pids": parent})
                return candidate if candidate._works() else None
        parents = {}
        for controller in ("memory", "pids"):
            mount = ROOT / controller
            if not (mount / "cgroup.procs").exists():
                return None
            parents[controller] = mount / own.get(controller, "/").lstrip("/")
        candidate = cls(1, parents)
        return candidate if candidate._works() else None

    def _works(self) -> bool:
        try:
            group = self.create(ResourceLimits(64, 16, 64, None))
        except OSError:
            return False
        group.remove()
        return True

    def sweep(self) -> list[str]:
        """Remove the cgroups of workers that are gone (killed before they could): empty
        ones only, as a worker's own ``rmdir`` would. One whose processes are still
        exiting (a worker SIGKILLed a moment ago: its reaper is killing its Bun
        processes) is removed in the background once empty, as a worker's own is."""
        removed = []
        for parent in set(self.parents.values()):
            with contextlib.suppress(OSError), os.scandir(parent) as entries:
                for entry in entries:
                    match = _NAME.match(entry.name)
                    if match is None or pid_alive(int(match.group(1))):
                        continue
                    try:
                        os.rmdir(entry.path)
                        removed.append(entry.path)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        remove_when_empty(Path(entry.path))
        return removed

    def create(self, limits: ResourceLimits) -> Cgroup:
        name = f"toolq-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if self.version == 2:
            path = self.parents["memory"] / name
            path.mkdir()
            group = Cgroup({"memory": path}, 2)
            try:
                (path / "memory.max").write_text(str(limits.max_memory_mb * 2**20))
                (path / "memory.swap.max").write_text("0")
                (path / "pids.max").write_text(str(limits.max_processes))
            except OSError:
                group.remove()
                raise
            return group
        dirs = {controller: parent / name for controller, parent in self.parents.items()}
        group = Cgroup({}, 1)
        try:
            for controller, path in dirs.items():
                path.mkdir()
                group.dirs[controller] = path
            memory = dirs["memory"]
            (memory / "memory.limit_in_bytes").write_text(str(limits.max_memory_mb * 2**20))
            with contextlib.suppress(OSError):  # absent without swap accounting
                (memory / "memory.memsw.limit_in_bytes").write_text(
                    str(limits.max_memory_mb * 2**20)
                )
            (dirs["pids"] / "pids.max").write_text(str(limits.max_processes))
        except OSError:
            group.remove()
            raise
        return group


def preexec(
    cgroup: Cgroup | None, limits: ResourceLimits, uid: int | None = None
) -> Callable[[], None]:
    """What the child runs before exec: join its cgroup (before it can fork), set rlimits,
    then drop to ``uid``/gid ``uid`` (joining needs root, so it comes last here)."""
    procs = cgroup.procs_files() if cgroup is not None else []
    nofile = limits.max_open_files

    def setup() -> None:
        for path in procs:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

    return setup


SETPRIV = shutil.which("setpriv")
"""util-linux's setpriv: drops the joined shell to the tools' uid before bwrap runs."""
JOIN_SHELL = "/bin/sh"
"""Joins a new process to its cgroup before it execs bwrap or Bun (:func:`joining`)."""
CGJOIN = Path(__file__).resolve().with_name("cgjoin")
"""workers/runtime/cgjoin.c, built by ``make setup``: the shell's and setpriv's steps in
one small exec."""


def cgjoin() -> str | None:
    """The built cgjoin helper, if this install has one (else the shell joins)."""
    return str(CGJOIN) if os.access(CGJOIN, os.X_OK) else None


def can_join(uid: int | None) -> bool:
    """Whether :func:`joining` can start a process in its cgroup here (as ``uid``)."""
    return cgjoin() is not None or uid is None or SETPRIV is not None


def joining(
    cgroup: Cgroup, limits: ResourceLimits, argv: list[str], uid: int | None = None
) -> list[str]:
    """``argv`` behind a step that first joins ``cgroup``, sets the open-file rlimit and,
    with ``uid``, drops to that uid/gid (joining needs root, so it comes first).

    The child must join before bwrap or Bun can fork. A ``preexec_fn`` would do it in
    Python, but then subprocess forks the whole worker instead of using vfork: from a
    150 MB process ~25 ms and ~12 ms of CPU per process, against ~3 ms and ~3 ms for a
    shell and ``setpriv`` (``bench/investigations/spawn_cost.py``), and ~1 ms of CPU for
    ``cgjoin`` (workers/runtime/cgjoin.c), used when built. A failed join ends the step
    with 126, before Bun runs.
    """
    helper = cgjoin()
    if helper is not None:
        options = [arg for path in cgroup.procs_files() for arg in ("-c", path)]
        options += ["-n", str(int(limits.max_open_files))]
        if uid is not None:
            options += ["-u", str(int(uid))]
        return [helper, *options, "--", *argv]
    joins = "".join(f"echo 0 > {shlex.quote(path)} || exit 126; " for path in cgroup.procs_files())
    drop = ""
    if uid is not None:
        assert SETPRIV is not None  # launch() falls back to preexec() without it
        drop = f"{shlex.quote(SETPRIV)} --reuid={uid} --regid={uid} --clear-groups -- "
    script = f'{joins}ulimit -n {int(limits.max_open_files)} || exit 126; exec {drop}"$@"'
    return [JOIN_SHELL, "-c", script, "toolq-join", *argv]


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_cgroups() -> dict[str, str]:
    """controller -> this process's cgroup path ('' for the v2 hierarchy)."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    return own


def read_proc(path: str) -> str:
    """One small /proc file, without Python's io layers (this runs during every call)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of one process so far."""
    try:
        fields = read_proc(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    try:
        return int(read_proc(f"/proc/{pid}/statm").split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def main_process(pid: int, sandboxed: bool) -> int | None:
    """The host pid of Bun itself, the first process below bwrap (and bwrap's init in the
    PID namespace); None while the sandbox is still starting it.

    Until the launched process is bwrap, nothing is known: it may still be the joining
    shell, setpriv, or, for a moment after ``Popen`` returns, the worker's own name (the
    kernel lets a vfork parent go on before it renames the exec'ing child). Taking that
    for Bun would stick: its process would never look started.
    """
    if not sandboxed:
        return pid
    current = pid
    for _ in range(4):
        try:
            comm = read_proc(f"/proc/{current}/comm").strip()
            if comm != "bwrap":
                return current if current != pid else None
            children = read_proc(f"/proc/{current}/task/{current}/children").split()
        except OSError:
            return None
        if not children:
            return None
        current = int(children[0])
    return None
