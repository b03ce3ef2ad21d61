"""What a queue message must be before kombu and Celery act on it, as pure functions: a
check returns why a message is poison (or None) and never acts on it.

:mod:`toolq.workers.poison` does the acting (acknowledge, dead-letter, answer) and the
wiring into kombu's Redis transport and Celery's consumer; the checks are apart so that
what "poison" means reads (and can be tested) in one place, without any of that wiring.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu.utils import json as kombu_json

from toolq.config.celery_app import RUN_BATCH_TASK, RUN_TOOL_TASK
from toolq.errors import InvalidInput
from toolq.protocol import chunk_from_message, chunk_ids
from toolq.signing import Signer

PREVIEW_CHARS = 1024
"""How much of an unreadable body or header value the dead-letter entry keeps."""
UNDECODABLE = "__toolq_undecodable__"
"""The key :func:`tolerant_loads` keeps a queue entry that is not JSON under."""


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


# -- layer 1: the raw Redis entry, before kombu builds a Message ---------------------------


def tolerant_loads(text: Any) -> Any:
    """kombu's ``loads`` for queue entries: an entry that is not JSON is kept, marked."""
    try:
        return kombu_json.loads(text)  # type: ignore[no-untyped-call]
    except ValueError:
        return {UNDECODABLE: text}


def check_raw(raw: Any) -> str | None:
    """Why kombu could not make a Message of this entry (``None``: it can)."""
    if not isinstance(raw, dict):
        return "the queue entry is not a JSON object"
    if UNDECODABLE in raw:
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
        task=str_or_none(task),
        queue=str_or_none(delivery.get("routing_key")),
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
        poison.body = preview(raw_body)
        return refused("the body is not JSON")
    poison.body = preview(raw_body)
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


def poison_of(message: Any, reason: str) -> Poison:
    """What can be read of a message Celery itself could not take, and why."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    call_id = headers.get("id")
    return Poison(
        reason,
        call_id=call_id if isinstance(call_id, str) and call_id else None,
        task=str_or_none(headers.get("task")),
        queue=str_or_none(delivery.get("routing_key")),
        headers=headers,
        body=preview(message.body),
    )


def str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def preview(value: Any) -> Any:
    """Small JSON values as they are; anything long as a truncated string."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"
