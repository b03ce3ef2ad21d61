"""The worker's result backend: Celery's Redis backend, one round trip per result.

Celery's ``store_result`` reads a result's key before it writes it, so that a task
delivered twice (its worker lost) cannot overwrite a success with a later outcome. A
toolq worker makes that check itself, once, where it can happen: a redelivered call
first looks for its stored result (``workers/tasks.py``), and a chunk skips the calls
that ended (``workers/batch.py``). So a *final* state (success, failure) is written
without the read — one round trip instead of two for every call. Other states (a
retry's RETRY) keep Celery's read: a quick retry may already have finished elsewhere.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, states
from celery.backends.redis import RedisBackend

_PATH = f"{__name__}:WorkerResultBackend"


class WorkerResultBackend(RedisBackend):  # type: ignore[misc]
    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if state not in states.READY_STATES:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else str(task_id)
        self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        return result


def use_worker_backend(app: Celery) -> None:
    """Make ``app`` (a worker's, before its backend is first used) store results with
    :class:`WorkerResultBackend` when its backend is plain Redis (not Sentinel)."""
    url = str(app.conf.result_backend or "")
    if url.startswith(("redis://", "rediss://", "unix://")):
        app.conf.result_backend = f"{_PATH}+{url}"
