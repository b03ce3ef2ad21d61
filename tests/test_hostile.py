"""Issue 29: hostile tools and callers, round two. Each attack tried end to end, against a
real worker (real Redis, real Celery, real Bun in its sandbox), as the issue found it."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import StartWorker, descendants, wait_until
from toolq.producers.client import ToolClient
from toolq.validation import MAX_JSON_DEPTH


def _zombies_below(pid: int) -> list[int]:
    found = []
    for child in descendants(pid):
        try:
            with open(f"/proc/{child}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    found.append(child)
        except OSError:
            continue
    return found


# -- 1. a result nested thousands of levels deep ----------------------------------------------


@pytest.mark.parametrize("tool_id", ["nest", "nest_spawn"])
def test_a_deep_result_is_invalid_output_never_retried_and_frees_its_process(
    client: ToolClient, start_worker: StartWorker, tool_id: str
) -> None:
    """Tool: {a:{a:…}} 5,000 levels made the worker's json.loads raise RecursionError: the
    call ended crashed (retried), a warm process was neither returned nor retired (after
    max_concurrent_tools such calls, no warm call ran again) and a spawned one was left a
    zombie. More deep calls than the pool holds, then an ordinary call on the same worker."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    worker = start_worker(queues=[queue])
    for _ in range(6):  # the pool holds 4 (max_concurrent_tools)
        deep = client.run(tool_id, {"depth": 5000}, queue=queue, wait=60)
        assert deep.error is not None and deep.error.kind == "invalid_output", deep
        assert f"deeper than {MAX_JSON_DEPTH} levels" in deep.error.message
        assert deep.metadata["attempts"] == 1  # never retried
    at_the_limit = client.run(tool_id, {"depth": MAX_JSON_DEPTH - 1}, queue=queue, wait=60)
    assert at_the_limit.ok, at_the_limit.error
    assert client.run("nest", {"depth": 3}, queue=queue, wait=60).ok  # warm serves on
    assert wait_until(lambda: not _zombies_below(worker.pid)), _zombies_below(worker.pid)
