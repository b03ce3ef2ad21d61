"""Which process of a launched tree is Bun: real processes named as the sandbox's would
be (a process may rename itself through /proc/self/comm), so no sandbox is needed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from toolq.workers.runtime.limits import main_process, read_proc

NAMED = """
import subprocess, sys, time
with open("/proc/self/comm", "w") as comm:
    comm.write(sys.argv[1])
if len(sys.argv) > 2:  # a child of its own, named too
    subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[2]])
time.sleep(60)
"""


def comm(pid: int) -> str:
    try:
        return read_proc(f"/proc/{pid}/comm").strip()
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    return [int(child) for child in read_proc(f"/proc/{pid}/task/{pid}/children").split()]


@contextmanager
def named_tree(top: str, below: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A process called ``top`` (and under it one called ``below``), once both are named."""
    argv = [sys.executable, "-c", NAMED, top] + ([below, NAMED] if below else [])
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (
            comm(proc.pid) == top
            and (below is None or any(comm(child) == below for child in children(proc.pid)))
        ):
            assert time.monotonic() < deadline, "the processes never took their names"
            time.sleep(0.01)
        yield proc
    finally:
        for child in children(proc.pid) if proc.poll() is None else []:
            subprocess.run(["kill", "-9", str(child)], check=False)
        proc.kill()
        proc.wait()


def test_bun_is_the_first_process_below_bwrap() -> None:
    with named_tree("bwrap", "bun.exe") as top:
        assert main_process(top.pid, sandboxed=True) == children(top.pid)[0]


@pytest.mark.parametrize("name", ["python", "sh", "setpriv"])
def test_nothing_is_known_until_the_launched_process_is_bwrap(name: str) -> None:
    """Right after Popen returns, the exec'ing child may still carry the worker's name
    (the kernel lets a vfork parent go on before it renames the child); before bwrap come
    the joining shell and setpriv. Taken for Bun, the launched process would never look
    started and a warm process would be retired after every call (seen under load)."""
    with named_tree(name) as top:
        assert main_process(top.pid, sandboxed=True) is None


def test_a_process_outside_a_sandbox_is_bun_itself() -> None:
    with named_tree("bun.exe") as top:
        assert main_process(top.pid, sandboxed=False) == top.pid
