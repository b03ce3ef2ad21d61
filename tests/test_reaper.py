"""The reaper: one small process per worker process that kills its Bun process groups when
the worker process is gone, and that a worker process ending normally ends with it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import process_alive, wait_until

PROGRAM = textwrap.dedent(
    """
    import subprocess
    from toolq.workers.runtime.reaper import reaper

    child = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a group of its own
    reaper().track(child.pid)
    print(child.pid, reaper()._proc.pid, flush=True)
    """
)


def test_a_process_that_exits_normally_takes_its_reaper_and_groups_with_it() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", PROGRAM],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    group_leader, reaper_pid = (int(word) for word in done.stdout.split())
    # Waited for at exit: the reaper did not outlive the process (Python warned that it
    # was "still running" when it was left to see the pipe close after the exit).
    assert f"subprocess {reaper_pid} is still running" not in done.stderr, done.stderr
    assert not process_alive(reaper_pid)
    # and it killed the group it still had listed, as after a crash
    assert wait_until(lambda: not process_alive(group_leader), 10)
