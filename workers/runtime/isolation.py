"""The boundary between two calls of one warm process: what a call left behind goes
before the next call starts.

- **Processes.** Every process the call started is killed, detached or not: a
  grandchild that ``setsid``s or double-forks leaves Bun's tree, but not the sandbox
  (orphans in its PID namespace are reparented to bwrap's init) nor the process's
  cgroup. With a cgroup its member list is read (one file); without, the tree under
  bwrap is walked. What is kept: bwrap, its init and Bun.
- **Scratch space.** The sandbox's private ``/tmp`` and ``/dev/shm`` (tmpfs mounts of
  its own) are emptied from the host through ``/proc/<bun>/root`` — what is mounted
  there (TMPDIR, which the runner empties itself, or a project bound under /tmp) is
  left alone. Only a tmpfs private to the sandbox is ever emptied: a host directory
  bound there is not the boundary's to clear. A directory whose times did not change
  is not read.

If either cannot be made sure (a process keeps forking, the sandbox's root cannot be
read) the boundary says so and the warm process is retired instead of reused.
Unsandboxed, ``/tmp`` is the host's and a detached grandchild without a cgroup is out
of reach: only the sandbox (or ``isolation: strict``) gives these guarantees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass

from toolq.workers.runtime.launch import Launched
from toolq.workers.runtime.limits import read_proc

log = logging.getLogger("toolq.worker")

SCRATCH = ("/tmp", "/dev/shm")
"""Writable places every sandbox has, whatever it was granted."""
_KILL_ROUNDS = 10


@dataclass
class _Scratch:
    """One scratch directory of the sandbox, seen from the host."""

    dirs: tuple[str, ...]
    """Whose entries are removed: the root and the directories leading to mount points."""
    keep: frozenset[str]
    """Mount points and the directories leading to them (host paths)."""
    stamp: tuple[tuple[int, int], ...] | None = None

    def times(self) -> tuple[tuple[int, int], ...]:
        stats = [os.stat(path, follow_symlinks=False) for path in self.dirs]
        return tuple((st.st_mtime_ns, st.st_ctime_ns) for st in stats)


class CallBoundary:
    """Clears what one call left in a warm process; built once per process."""

    def __init__(self, launched: Launched) -> None:
        self.launched = launched
        self._keep: frozenset[int] | None = None
        self._scratch: list[_Scratch] | None = None

    def clear(self) -> bool:
        """Kill the call's leftover processes and empty the scratch space; False if that
        could not be made sure (the process must then be retired)."""
        if not self.launched.bun_started:
            return False
        try:
            return self._kill_leftovers() and self._empty_scratch()
        except OSError:
            log.warning("cannot clear a warm process after a call; retiring it", exc_info=True)
            return False

    # -- processes -----------------------------------------------------------------------

    def _kill_leftovers(self) -> bool:
        keep = self._kept()
        for _ in range(_KILL_ROUNDS):
            strays = [pid for pid in self._members() if pid not in keep and _alive(pid)]
            if not strays:
                return True
            for pid in strays:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        return False

    def _kept(self) -> frozenset[int]:
        """bwrap, its init and Bun: Bun and its ancestors up to the launched process."""
        if self._keep is None:
            top, pid = self.launched.pid, self.launched.bun_pid
            chain = {top, pid}
            while pid != top and pid > 1:
                pid = _parent(pid)
                chain.add(pid)
            self._keep = frozenset(chain)
        return self._keep

    def _members(self) -> list[int]:
        """Every process of this warm process: its cgroup's, else the tree under it."""
        cgroup = self.launched.cgroup
        if cgroup is not None:
            procs = read_proc(cgroup.procs_files()[0])
            return [int(pid) for pid in procs.split()]
        found, pending = [], [self.launched.pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    children = read_proc(f"/proc/{pid}/task/{tid}/children")
                    pending += [int(child) for child in children.split()]
        return found

    # -- scratch space -------------------------------------------------------------------

    def _empty_scratch(self) -> bool:
        if not self.launched.sandboxed:
            return True  # /tmp is the host's: only TMPDIR is private (the runner's)
        if self._scratch is None:
            self._scratch = _private_scratch(self.launched.bun_pid)
        for scratch in self._scratch:
            if scratch.stamp is not None and scratch.times() == scratch.stamp:
                continue
            for directory in scratch.dirs:
                with os.scandir(directory) as entries:
                    leftovers = [entry for entry in entries if entry.path not in scratch.keep]
                for entry in leftovers:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)  # fd-based: never follows a planted link
                    else:
                        os.unlink(entry.path)
            scratch.stamp = scratch.times()
        return True


def _private_scratch(bun_pid: int) -> list[_Scratch]:
    """The scratch directories that are on a tmpfs of the sandbox's own."""
    root = f"/proc/{bun_pid}/root"
    mounts = _mount_points(f"/proc/{bun_pid}/mountinfo")
    host_devices = _devices("/proc/self/mountinfo")
    found = []
    for scratch in SCRATCH:
        try:
            device = os.stat(root + scratch, follow_symlinks=False).st_dev
        except OSError:
            continue
        if f"{os.major(device)}:{os.minor(device)}" in host_devices:
            log.debug("%s in the sandbox is a host filesystem: not emptied", scratch)
            continue
        inner = {m for m in mounts if m.startswith(scratch + "/")}
        leading = set()  # the directories between the scratch root and a mount point
        for mount in inner:
            parent = os.path.dirname(mount)
            while parent != scratch:
                leading.add(parent)
                parent = os.path.dirname(parent)
        keep = {root + path for path in inner | leading}
        dirs = [root + scratch, *sorted(root + path for path in leading - inner)]
        found.append(_Scratch(tuple(dirs), frozenset(keep)))
    return found


def _mount_points(mountinfo: str) -> set[str]:
    points = set()
    for line in _read(mountinfo).splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.add(_unescape(fields[4]))
    return points


def _devices(mountinfo: str) -> set[str]:
    return {line.split()[2] for line in _read(mountinfo).splitlines() if line.strip()}


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.read()


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(escaped, char)
    return path


def _parent(pid: int) -> int:
    try:
        return int(read_proc(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 1


def _alive(pid: int) -> bool:
    """Running (a zombie waits for its parent to reap it: it holds nothing)."""
    try:
        state = read_proc(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
