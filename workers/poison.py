"""Poison messages: nothing on a queue can stop or wedge a worker.

A queue entry the toolq task cannot decode or validate — not JSON, not kombu's envelope,
a body that is not base64, missing ``id``/``task`` headers, an unknown task, a body
that is not Celery's ``[args, kwargs, embed]``, arguments that do not fit the task, a
request that is not a JSON object — is checked *before* kombu or Celery act on it
(they crash, exit, lose or requeue-forever such messages), then:

- acknowledged (never requeued: it would poison the next worker too),
- recorded in the dead-letter list with what could be read of it and why
  (``retry_stopped: "poison"``, ``poison: {reason, headers, body}``),
- answered with a toolq envelope (kind ``invalid_input``) stored as the call's result
  when the message carries an id and that call has no result yet,

and the worker goes on serving. Two layers, because kombu fails before Celery sees
anything: a check of the raw Redis entry (:func:`_deliver`, patched into kombu's Redis
transport) and a Celery consumer (:class:`PoisonSafeConsumer`) that checks each message
and routes every one of Celery's own "bad message" callbacks here. Anything else that
goes wrong while Celery takes a message in is handled the same way, never raised.

What makes a message poison is :mod:`toolq.workers.poison_checks` (pure checks); this
module acts on a refusal and wires the checks into kombu and Celery.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import replace
from typing import Any

from celery import Celery, states
from celery.signals import worker_init
from celery.worker.consumer import Consumer
from kombu.exceptions import MessageStateError
from kombu.transport import redis as _kombu_redis

from toolq.config.settings import Settings
from toolq.envelope import ToolErrorInfo, ToolResult
from toolq.errors import InvalidInput
from toolq.sealing import SEALED_FIELD, Sealer, env_fields
from toolq.signing import Signer
from toolq.workers import brokerfix, control
from toolq.workers.poison_checks import (
    UNDECODABLE,
    Poison,
    check_message,
    check_raw,
    poison_of,
    preview,
    str_or_none,
    tolerant_loads,
)

log = logging.getLogger("toolq.worker")
kombu_redis: Any = _kombu_redis  # patched by install(): typed loosely on purpose


class _Handler:
    """What a refused message needs: the app (result backend) and the dead-letter list."""

    def __init__(
        self, app: Celery, settings: Settings, signer: Signer | None, sealer: Sealer | None
    ) -> None:
        self.app = app
        self.settings = settings
        self.signer = signer
        self.sealer = sealer
        self.hostname = ""
        self._dead_letters: Any = None

    def refuse(self, poison: Poison) -> None:
        """Record and answer one refused message; never raises (the worker must go on)."""
        log.warning(
            "poison message %s on %s (task %s): %s; acknowledged and dead-lettered",
            poison.call_id or "(no id)",
            poison.queue,
            poison.task,
            poison.reason,
        )
        tool_id = ""
        if poison.request is not None:
            tool_id = str(poison.request.get("tool_id") or "")
        failure = InvalidInput(f"poison message: {poison.reason}", "PoisonMessage")
        result = ToolResult(
            poison.call_id or "",
            tool_id,
            error=ToolErrorInfo.from_failure(failure),
            metadata={
                "tool_id": tool_id,
                "tool_exec_id": poison.call_id,
                "execution_time": 0,
                "attempts": 0,
                "worker": self.hostname,
                "retry_stopped": "poison",
            },
        )
        try:
            self._dead_letter(poison, result)
        except Exception:
            log.warning("cannot dead-letter poison message %s", poison.call_id, exc_info=True)
        # A chunk's own id has no caller; its calls' ids do.
        answered = poison.chunk_ids or ([poison.call_id] if poison.call_id else [])
        for call_id in answered:
            try:
                self._answer(
                    call_id,
                    replace(
                        result, id=call_id, metadata={**result.metadata, "tool_exec_id": call_id}
                    ),
                )
            except Exception:
                log.warning("cannot store a result for %s", call_id, exc_info=True)

    def _answer(self, call_id: str, result: ToolResult) -> None:
        backend = self.app.backend
        if backend.get_task_meta(call_id).get("status") in states.READY_STATES:
            return  # a message re-using a finished call's id must not rewrite its result
        backend.store_result(call_id, result.to_dict(), states.SUCCESS)

    def _dead_letter(self, poison: Poison, result: ToolResult) -> None:
        if self._dead_letters is None:
            from toolq.config.connections import redis_client
            from toolq.workers.deadletter import DeadLetters

            self._dead_letters = DeadLetters.from_settings(
                redis_client(self.settings), self.settings
            )
        request = poison.request or {}
        env, token = request.get("env"), request.get(SEALED_FIELD)
        entry: dict[str, Any] = {
            "id": poison.call_id or f"poison-{uuid.uuid4()}",
            "tool_id": result.tool_id,
            "input": request.get("input"),
            # sealed whenever this worker has a key, as the handler's dead letters
            **env_fields(
                env if isinstance(env, dict) else {},
                token if isinstance(token, str) else None,
                self.sealer,
            ),
            "timeout": request.get("timeout"),
            "queue": poison.queue,
            "error": result.error.to_dict() if result.error else None,
            "attempts": 0,
            "attempt_history": [],
            "retry_stopped": "poison",
            "worker": self.hostname,
            "poison": {
                "reason": poison.reason,
                "task": poison.task,
                "headers": {key: preview(value) for key, value in poison.headers.items()},
                "body": poison.body,
            },
        }
        self._dead_letters.add(entry)


_handler: _Handler | None = None


def install(
    app: Celery, settings: Settings, signer: Signer | None = None, sealer: Sealer | None = None
) -> None:
    """Make ``app``'s workers poison-safe (and broker-restart-safe: see brokerfix); with a
    ``signer`` (a secret key), a call without a valid signature is poison too, and with a
    ``sealer`` a refused call's env is dead-lettered sealed."""
    global _handler
    _handler = _Handler(app, settings, signer, sealer)
    brokerfix.install()
    kombu_redis.loads = tolerant_loads
    if kombu_redis.Transport._deliver is not _deliver:
        _deliver.__dict__["original"] = kombu_redis.Transport._deliver
        kombu_redis.Transport._deliver = _deliver
    app.conf.worker_consumer = f"{__name__}:PoisonSafeConsumer"
    worker_init.connect(_remember_worker, weak=False)


_workers: list[Any] = []


def _remember_worker(sender: Any = None, **_: Any) -> None:
    _workers.append(sender)


def exit_with_worker_code() -> None:
    """Exit with the worker's own code: Celery's ``worker_main`` drops it, so an
    "Unrecoverable error" exited 0 and no supervisor would restart the worker."""
    code = getattr(_workers[-1], "exitcode", None) if _workers else None
    if code:
        raise SystemExit(code)


# -- layer 1: the raw Redis entry, before kombu builds a Message ---------------------------


def _deliver(self: Any, raw: Any, queue: str) -> None:
    """kombu's ``Transport._deliver``, refusing entries it would crash on."""
    problem = check_raw(raw)
    if problem is None:
        _deliver.__dict__["original"](self, raw, queue)
        return
    headers = raw.get("headers") if isinstance(raw, dict) else None
    headers = headers if isinstance(headers, dict) else {}
    call_id = headers.get("id")
    # Popped from the list before it was ever tracked as unacknowledged: dropping it
    # here is its acknowledgement.
    poison = Poison(
        problem,
        call_id=call_id if isinstance(call_id, str) and call_id else None,
        task=str_or_none(headers.get("task")),
        queue=queue,
        headers=headers,
        body=preview(raw.get(UNDECODABLE, raw) if isinstance(raw, dict) else raw),
    )
    _refuse(poison)


# -- layer 2: the Celery message, before Celery's strategy and Request ---------------------


class PoisonSafeConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, with every bad-message path acknowledging and answering, and
    its remote control limited to ``remote_control``'s commands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _handler is not None:
            _handler.hostname = str(self.hostname)
        # What Redis may tell this worker to do (workers/control.py): read-only by default.
        control.restrict(self, _handler.settings.remote_control if _handler else "inspect")

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        celery_handler = super().create_task_handler(*args, **kwargs)
        connection_errors = tuple(self.connection_errors)

        def on_task_received(message: Any) -> None:
            try:
                signer = _handler.signer if _handler is not None else None
                poison = check_message(message, self.app, signer)
            except Exception as exc:  # a check must never be what stops the worker
                poison = Poison(f"unreadable message: {exc!r}")
            if poison is not None:
                _refuse_message(message, poison)
                return
            try:
                celery_handler(message)
            except connection_errors:
                raise  # the consumer reconnects; the message is redelivered
            except Exception as exc:
                _refuse_message(message, poison_of(message, f"Celery could not take it: {exc!r}"))

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _refuse_message(message, poison_of(message, f"cannot decode the body: {exc!r}"))

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _refuse_message(message, poison_of(message, "not a Celery task message"))

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        _refuse_message(message, poison_of(message, f"unknown task: {exc!r}"))

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        _refuse_message(message, poison_of(message, f"invalid task message: {exc!r}"))

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        brokerfix.keep_unacked_on_close(self.connection)
        super().on_connection_error_after_connected(exc)


def _refuse_message(message: Any, poison: Poison) -> None:
    _refuse(poison)
    with contextlib.suppress(MessageStateError):  # Celery may have acknowledged it
        message.ack()


def _refuse(poison: Poison) -> None:
    if _handler is None:  # not installed: only log (never raise from the consumer)
        log.warning("poison message %s: %s", poison.call_id, poison.reason)
        return
    _handler.refuse(poison)
