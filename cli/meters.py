"""Measuring a process tree from /proc (or a cpuacct cgroup): resident and proportional
memory, CPU seconds; and the Redis commands a worker sends. For `toolq bench` and the
scripts in bench/."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolq.workers.assembly import WorkerParts


def count_commands(parts: WorkerParts) -> list[str]:
    """Commands this thread sends through the worker's Redis client, from now on."""
    sent: list[str] = []
    me = threading.get_ident()
    execute = parts.redis.execute_command

    def counted(*args: Any, **options: Any) -> Any:
        if threading.get_ident() == me:
            sent.append(str(args[0]))
        return execute(*args, **options)  # type: ignore[no-untyped-call]

    parts.redis.execute_command = counted  # type: ignore[method-assign]
    return sent


def _process_table() -> tuple[dict[int, list[int]], dict[int, list[str]]]:
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children, stats


def _tree(root_pid: int, children: dict[int, list[int]]) -> list[int]:
    pids, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def tree_rss_mib(root_pid: int) -> float:
    """Resident memory of ``root_pid`` and every process below it."""
    children, _ = _process_table()
    total = 0
    for pid in _tree(root_pid, children):
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


def tree_pss_mib(root_pid: int) -> float:
    """Proportional memory of ``root_pid`` and every process below it: a page shared by
    n processes counts 1/n in each (``/proc/PID/smaps_rollup``)."""
    children, _ = _process_table()
    total_kib = 0
    for pid in _tree(root_pid, children):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total_kib += int(line.split()[1])
                        break
        except (OSError, IndexError, ValueError):
            continue
    return total_kib / 1024


def process_tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process tree: its live members plus the children they reaped."""
    children, stats = _process_table()
    ticks = 0
    for pid in _tree(root_pid, children):
        fields = stats.get(pid)
        if fields:  # utime, stime, cutime, cstime (fields 14-17 of /proc/pid/stat)
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by a worker and everything it ever started.

    The /proc tree misses a descendant killed before its parent reaped it (a sandboxed
    Bun's time reaches the worker only through bwrap's waits), so where this machine
    allows it, the worker's tree is put in a cpuacct cgroup of its own (cgroup v1; new
    processes inherit it), whose counter sees every process. Else the /proc tree.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.group: Path | None = None
        root = Path("/sys/fs/cgroup/cpuacct")
        with contextlib.suppress(OSError):
            group = root / f"toolq-bench-{uuid.uuid4().hex[:8]}"
            group.mkdir()
            self.group = group
            children, _ = _process_table()
            for member in _tree(pid, children):
                with contextlib.suppress(OSError):
                    (group / "cgroup.procs").write_text(str(member))

    @property
    def source(self) -> str:
        return "cpuacct cgroup" if self.group is not None else "/proc tree"

    def seconds(self) -> float:
        if self.group is not None:
            return int((self.group / "cpuacct.usage").read_text()) / 1e9
        return process_tree_cpu_s(self.pid)

    def close(self) -> None:
        """Once the worker has exited: what is left (a lingering child) goes back to the
        parent group, so the cgroup can be removed."""
        if self.group is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for member in (self.group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.group.parent / "cgroup.procs").write_text(member)
                self.group.rmdir()
                return
            time.sleep(0.1)
