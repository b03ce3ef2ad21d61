"""What a sandbox hides again under a broad ``--allow-read`` (which binds the host's ``/``).

- **Host unix sockets, always.** A read-only mount does not stop ``connect()`` on a unix
  socket, so the host's ``/`` put every local database, Docker's and D-Bus's sockets in
  reach. ``/run`` and ``/var/run`` are empty in the sandbox (the files ``/etc/resolv.conf``
  points to there are put back), and every other socket the host has bound (read from
  ``/proc/net/unix``, read again after a second) is covered by ``/dev/null``. A grant
  that names one (``--allow-read=/run/postgresql``) is bound after, and works.
- **A worker that is not root: its own user's files.** Such a worker starts bwrap as
  itself, so on the host the tool *is* the worker's user (65534 exists only inside the
  user namespace) and the kernel lets it read that user's 0600 files. Hidden: every home
  (``/home``, ``/root``, the worker's ``$HOME``), ``/var/tmp``, every directory directly
  under ``/``, ``/etc``, ``/opt``, ``/srv``, ``/var``, ``/var/lib``, ``/mnt``, ``/media``
  that the worker's user owns, and the files the worker names (its ``secret_key_file``).
  Anything else that user owns and keeps elsewhere stays readable: run workers as root
  (tools then drop to uid 65534 on the host) or as a user that owns nothing else
  (docs/security/sandbox.md, "Who the tool is").
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import threading
import time
from collections.abc import Iterable, Sequence

ALWAYS_HIDDEN = ("/run", "/var/run")
OWN_PARENTS = ("/", "/etc", "/opt", "/srv", "/var", "/var/lib", "/mnt", "/media")
NEVER_HIDDEN = frozenset({"/", "/tmp", "/proc", "/dev", "/sys", "/usr", "/etc", "/var"})
"""Provided by the sandbox itself, or needed whole (a worker's user owning /usr is not a
worker this can help)."""
SOCKETS_TTL_S = 1.0


def hidden_dirs(worker_uid: int | None, home: str | None = None) -> list[str]:
    """Directories an empty read-only tmpfs covers under ``--allow-read``; ``worker_uid``
    None for a root worker (whose tools are uid 65534 on the host already)."""
    wanted = list(ALWAYS_HIDDEN)
    if worker_uid is not None:
        wanted += ["/home", "/root", "/var/tmp"]
        wanted += [home] if home else []
        with contextlib.suppress(KeyError):
            wanted.append(pwd.getpwuid(worker_uid).pw_dir)
        wanted += _owned_by(worker_uid, OWN_PARENTS)
    return _outermost(wanted)


def resolver_files() -> list[str]:
    """The files under a hidden directory that name resolution reads (/etc/resolv.conf
    is often a link into /run): put back, read-only."""
    found = []
    for name in ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf"):
        real = os.path.realpath(name)
        if real != name and os.path.isfile(real) and real.startswith(("/run/", "/var/run/")):
            found.append(real)
    return found


class HostSockets:
    """The host's bound unix socket paths outside ``hidden`` (and outside /tmp, the
    sandbox's own), from ``/proc/net/unix``, read again at most once a second."""

    def __init__(self, hidden: Sequence[str]) -> None:
        self.hidden = tuple(hidden)
        self._lock = threading.Lock()
        self._read_at = -SOCKETS_TTL_S
        self._paths: list[str] = []

    def paths(self) -> list[str]:
        """Those that exist now: bwrap cannot cover a path that is gone (it would try to
        make its parents in the read-only root and refuse to start the sandbox), and the
        table is up to a second old (a socket removed since, a test's or a short-lived
        program's, failed the next launch)."""
        now = time.monotonic()
        with self._lock:
            if now - self._read_at >= SOCKETS_TTL_S:
                self._paths = self._read()
                self._read_at = now
            listed = self._paths
        return [path for path in listed if _is_socket(path)]

    def _read(self) -> list[str]:
        try:
            with open("/proc/net/unix") as table:
                lines = table.read().splitlines()[1:]
        except OSError:
            return []
        found = set()
        for line in lines:
            fields = line.split(None, 7)
            if len(fields) < 8 or not fields[7].startswith("/"):
                continue  # unnamed or abstract (the sandbox has a network namespace of its own)
            path = os.path.realpath(fields[7])
            if _under(path, (*self.hidden, "/tmp")):
                continue
            if _is_socket(path):
                found.add(path)
        return sorted(found)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _owned_by(uid: int, parents: Iterable[str]) -> list[str]:
    owned = []
    for parent in parents:
        with contextlib.suppress(OSError), os.scandir(parent) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if (
                        entry.is_dir(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_uid == uid
                    ):
                        owned.append(entry.path)
    return owned


def _outermost(paths: Iterable[str]) -> list[str]:
    """Real, existing directories, none inside another, none the sandbox provides."""
    real = set()
    for path in paths:
        resolved = os.path.realpath(path)
        if os.path.isdir(resolved) and resolved not in NEVER_HIDDEN:
            real.add(resolved)
    return sorted(p for p in real if not _under(p, tuple(real - {p})))


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)
