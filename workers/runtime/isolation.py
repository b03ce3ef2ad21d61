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
import time
from dataclasses import dataclass

from toolq.workers.runtime.launch import Launched
from toolq.workers.runtime.limits import read_proc
from toolq.workers.runtime.sandbox import SANDBOX_TMP

log = logging.getLogger("toolq.worker")

SCRATCH = ("/tmp", "/dev/shm")
KEPT_EMPTY = (SANDBOX_TMP,)
"""Directories in the scratch space that the next call needs (its TMPDIR): emptied, kept."""
"""Writable places every sandbox has, whatever it was granted."""
_KILL_ROUNDS = 10


@dataclass
class _Scratch:
    """One scratch directory of the sandbox (paths as the sandbox sees them)."""

    dirs: tuple[str, ...]
    """Whose entries are removed: the scratch root, then the directories leading to
    mount points under it (parents first)."""
    keep: frozenset[str]
    """Mount points under the root and the directories leading to them."""
    stamp: tuple[tuple[int, int], ...] | None = None

    def times(self, root: str) -> tuple[tuple[int, int], ...]:
        stats = [os.stat(root + path, follow_symlinks=False) for path in self.dirs]
        return tuple((st.st_mtime_ns, st.st_ctime_ns) for st in stats)


class CallBoundary:
    """Clears what one call left in a warm process; built once per process."""

    def __init__(self, launched: Launched) -> None:
        self.launched = launched
        self._keep: frozenset[int] | None = None
        self._scratch: list[_Scratch] | None = None
        self._mounts: set[str] = set()

    def prime(self, wait_s: float = 2.0) -> None:
        """Note where things are mounted in the sandbox before its first call (waiting
        for Bun to start, at most ``wait_s``): a call that later moves a directory
        holding a mount point is then seen, and its process retired."""
        if self._scratch is not None or not self.launched.sandboxed:
            return
        deadline = time.monotonic() + wait_s
        while not self.launched.bun_started and time.monotonic() < deadline:
            if self.launched.proc.poll() is not None:
                return
            time.sleep(0.002)
        if self.launched.bun_started:
            with contextlib.suppress(OSError):
                self._load_scratch()

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
        for attempt in range(_KILL_ROUNDS):
            strays = [pid for pid in self._members() if pid not in keep and _alive(pid)]
            if not strays:
                return True
            if attempt:
                time.sleep(0.001 * attempt)  # let the killed ones exit (~45 ms in all)
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
            procs = read_proc(cgroup.first_procs_file)
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
        pid = self.launched.bun_pid
        root = f"/proc/{pid}/root"
        scratches = self._scratch if self._scratch is not None else self._load_scratch()
        changed = [s for s in scratches if s.stamp is None or s.times(root) != s.stamp]
        if not changed:
            return True
        if _mount_points(pid) != self._mounts:
            return False  # a directory holding a mount point was moved: retire, never guess
        for scratch in changed:
            for directory in scratch.dirs:
                _clear(root, directory, scratch.keep)
            scratch.stamp = scratch.times(root)
        return True

    def _load_scratch(self) -> list[_Scratch]:
        pid = self.launched.bun_pid
        self._mounts = _mount_points(pid)
        self._scratch = _private_scratch(f"/proc/{pid}/root", self._mounts)
        return self._scratch


def _private_scratch(root: str, mounts: set[str]) -> list[_Scratch]:
    """The scratch directories that are on a tmpfs of the sandbox's own."""
    host_devices = {line.split()[2] for line in _read("/proc/self/mountinfo").splitlines()}
    found = []
    for scratch in SCRATCH:
        try:
            device = os.stat(root + scratch, follow_symlinks=False).st_dev
        except OSError:
            continue
        if f"{os.major(device)}:{os.minor(device)}" in host_devices:
            log.debug("%s in the sandbox is a host filesystem: not emptied", scratch)
            continue
        inner = {mount for mount in mounts if mount.startswith(scratch + "/")}
        emptied = {path for path in KEPT_EMPTY if path.startswith(scratch + "/")}
        leading = set(emptied)  # kept, emptied: up to a mount point or a kept directory
        for path in inner | emptied:
            parent = os.path.dirname(path)
            while parent != scratch:
                leading.add(parent)
                parent = os.path.dirname(parent)
        dirs = (scratch, *sorted(leading - inner))
        found.append(_Scratch(dirs, frozenset(inner | leading)))
    return found


def _clear(root: str, directory: str, keep: frozenset[str]) -> None:
    """Remove every entry of ``directory`` (a sandbox path) but those in ``keep``."""
    fd = _open_within(root, directory)
    try:
        with os.scandir(fd) as entries:
            leftovers = [
                (entry.name, entry.is_dir(follow_symlinks=False))
                for entry in entries
                if f"{directory}/{entry.name}" not in keep
            ]
        for name, is_dir in leftovers:
            if is_dir:
                shutil.rmtree(name, dir_fd=fd)  # fd-based: never follows a planted link
            else:
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)


def _open_within(root: str, path: str) -> int:
    """A descriptor of ``path`` inside the sandbox, opened one component at a time with
    no symlink followed: a tool could plant one pointing at a host directory (an
    absolute link would resolve against the host's root, not the sandbox's)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in path.strip("/").split("/"):
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mount_points(pid: int) -> set[str]:
    """Where things are mounted in the sandbox of ``pid``."""
    points = set()
    for line in _read(f"/proc/{pid}/mountinfo").splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.add(_unescape(fields[4]))
    return points


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
