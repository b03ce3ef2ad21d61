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
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import inspect
import json
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from celery import Celery, states
from celery.signals import worker_init
from celery.worker.consumer import Consumer
from kombu.exceptions import MessageStateError
from kombu.transport import redis as _kombu_redis
from kombu.utils import json as kombu_json

from toolq.config.celery_app import RUN_BATCH_TASK, RUN_TOOL_TASK
from toolq.config.settings import Settings
from toolq.envelope import ToolErrorInfo, ToolResult
from toolq.errors import InvalidInput
from toolq.protocol import chunk_from_message, chunk_ids
from toolq.sealing import SEALED_FIELD, Sealer, env_fields
from toolq.signing import Signer
from toolq.workers import brokerfix, control

log = logging.getLogger("toolq.worker")
kombu_redis: Any = _kombu_redis  # patched by install(): typed loosely on purpose

PREVIEW_CHARS = 1024
"""How much of an unreadable body or header value the dead-letter entry keeps."""
_UNDECODABLE = "__toolq_undecodable__"


@dataclass
class Poison:
    """Why a message was refused, and what could be read of it."""

    reason: str
    call_id: str | None = None
    task: str | None = None
    queue: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    request: dict[str, Any] | None = None
    body: str | None = None
    chunk_ids: list[str] = field(default_factory=list)
    """A refused chunk's call ids, as far as they can be read: each caller is answered."""


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
                "headers": {key: _preview(value) for key, value in poison.headers.items()},
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
    kombu_redis.loads = _tolerant_loads
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


def _tolerant_loads(text: Any) -> Any:
    """kombu's ``loads`` for queue entries: an entry that is not JSON is kept, marked."""
    try:
        return kombu_json.loads(text)  # type: ignore[no-untyped-call]
    except ValueError:
        return {_UNDECODABLE: text}


def check_raw(raw: Any) -> str | None:
    """Why kombu could not make a Message of this entry (``None``: it can)."""
    if not isinstance(raw, dict):
        return "the queue entry is not a JSON object"
    if _UNDECODABLE in raw:
        return "the queue entry is not JSON"
    properties = raw.get("properties")
    if not isinstance(properties, dict):
        return "no 'properties' object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "no 'properties.delivery_tag'"
    delivery = properties.get("delivery_info")
    if not isinstance(delivery, dict) or not all(
        isinstance(delivery.get(key), str) for key in ("exchange", "routing_key")
    ):
        return "'properties.delivery_info' lacks exchange and routing_key"
    if not isinstance(raw.get("headers"), dict):
        return "no 'headers' object"
    body, encoding = raw.get("body"), properties.get("body_encoding")
    if body is not None and not isinstance(body, str):
        return "'body' is not a string"
    if encoding == "base64":
        try:
            base64.b64decode(body or "", validate=True)
        except (binascii.Error, ValueError):
            return "'body' is not valid base64"
    elif encoding not in (None, "utf-8"):
        return f"unknown body_encoding {encoding!r}"
    return None


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
        task=_str_or_none(headers.get("task")),
        queue=queue,
        headers=headers,
        body=_preview(raw.get(_UNDECODABLE, raw) if isinstance(raw, dict) else raw),
    )
    _refuse(poison)


# -- layer 2: the Celery message, before Celery's strategy and Request ---------------------


def check_message(message: Any, app: Celery, signer: Signer | None = None) -> Poison | None:
    """Everything Celery's task strategy and the toolq task assume of a message; with a
    ``signer``, a call (or chunk) must carry a valid signature (:mod:`toolq.signing`)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    call_id, task = headers.get("id"), headers.get("task")
    poison = Poison(
        "",
        call_id=call_id if isinstance(call_id, str) and call_id else None,
        task=_str_or_none(task),
        queue=_str_or_none(delivery.get("routing_key")),
        headers=headers,
    )

    def refused(reason: str) -> Poison:
        poison.reason = reason
        return poison

    if not isinstance(task, str) or not task:
        return refused("no 'task' header")
    if poison.call_id is None:
        return refused("no 'id' header")
    if task not in app.tasks or task.startswith("celery."):
        return refused(f"unknown task {task!r}")
    if message.content_type != "application/json":
        return refused(f"content type {message.content_type!r} is not application/json")
    if message.content_encoding not in (None, "utf-8"):
        return refused(f"content encoding {message.content_encoding!r} is not utf-8")
    raw_body = message.body
    try:
        body = json.loads(raw_body)
    except (TypeError, ValueError, RecursionError):
        poison.body = _preview(raw_body)
        return refused("the body is not JSON")
    poison.body = _preview(raw_body)
    if not (
        isinstance(body, list)
        and len(body) == 3
        and isinstance(body[0], list)
        and isinstance(body[1], dict)
        and isinstance(body[2], dict)
    ):
        return refused("the body is not Celery's [args, kwargs, embed]")
    args, kwargs, embed = body
    problem = _check_headers(headers) or _check_embed(embed)
    if problem is not None:
        return refused(problem)
    try:
        bound = inspect.signature(app.tasks[task].run).bind(*args, **kwargs)
    except TypeError as exc:
        return refused(f"arguments do not fit {task}: {exc}")
    argument = next(iter(bound.arguments.values()), None)  # each toolq task has one
    if signer is not None and task in (RUN_TOOL_TASK, RUN_BATCH_TASK):
        # Before anything reads the request: a forged call is never decoded, let alone run.
        queue = poison.queue or app.conf.task_default_queue
        problem = signer.check(task, poison.call_id, queue, argument, headers)
        if problem is not None:
            poison.body = None  # it may hold a plain env: the dead letter seals the request's
            if task == RUN_BATCH_TASK:
                poison.chunk_ids = chunk_ids(argument)
            elif isinstance(argument, dict):
                poison.request = argument
            return refused(problem)
    if task == RUN_TOOL_TASK:
        if not isinstance(argument, dict):
            return refused("the request (args[0]) is not a JSON object")
        poison.request = argument
    if task == RUN_BATCH_TASK:
        try:
            chunk_from_message(argument)
        except InvalidInput as exc:
            poison.chunk_ids = chunk_ids(argument)
            return refused(f"not a chunk of calls: {exc}")
    poison.body = None  # readable: the request (input, env) is kept instead
    return None


def _check_headers(headers: dict[str, Any]) -> str | None:
    from celery.utils.time import maybe_iso8601

    for key in ("eta", "expires"):
        value = headers.get(key)
        if value is not None:
            try:
                maybe_iso8601(value)
            except (TypeError, ValueError, AttributeError):
                return f"header {key!r} is not an ISO 8601 time"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(v is None or isinstance(v, int | float) for v in limits)
    ):
        return "header 'timelimit' is not [soft, hard]"
    retries = headers.get("retries")
    if retries is not None and not isinstance(retries, int):
        return "header 'retries' is not an integer"
    for key in ("root_id", "parent_id", "group", "argsrepr", "kwargsrepr", "origin"):
        value = headers.get(key)
        if value is not None and not isinstance(value, str):
            return f"header {key!r} is not a string"
    return None


def _check_embed(embed: dict[str, Any]) -> str | None:
    for key in ("callbacks", "errbacks", "chain"):
        if embed.get(key) is not None and not isinstance(embed[key], list):
            return f"embed {key!r} is not a list"
    if embed.get("chord") is not None and not isinstance(embed["chord"], dict):
        return "embed 'chord' is not an object"
    return None


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
                _refuse_message(message, _poison_of(message, f"Celery could not take it: {exc!r}"))

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _refuse_message(message, _poison_of(message, f"cannot decode the body: {exc!r}"))

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _refuse_message(message, _poison_of(message, "not a Celery task message"))

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        _refuse_message(message, _poison_of(message, f"unknown task: {exc!r}"))

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        _refuse_message(message, _poison_of(message, f"invalid task message: {exc!r}"))

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        brokerfix.keep_unacked_on_close(self.connection)
        super().on_connection_error_after_connected(exc)


def _poison_of(message: Any, reason: str) -> Poison:
    headers = message.headers if isinstance(message.headers, dict) else {}
    delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    call_id = headers.get("id")
    return Poison(
        reason,
        call_id=call_id if isinstance(call_id, str) and call_id else None,
        task=_str_or_none(headers.get("task")),
        queue=_str_or_none(delivery.get("routing_key")),
        headers=headers,
        body=_preview(message.body),
    )


def _refuse_message(message: Any, poison: Poison) -> None:
    _refuse(poison)
    with contextlib.suppress(MessageStateError):  # Celery may have acknowledged it
        message.ack()


def _refuse(poison: Poison) -> None:
    if _handler is None:  # not installed: only log (never raise from the consumer)
        log.warning("poison message %s: %s", poison.call_id, poison.reason)
        return
    _handler.refuse(poison)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _preview(value: Any) -> Any:
    """Small JSON values as they are; anything long as a truncated string."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"
