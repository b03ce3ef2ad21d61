"""The call contract: the one typed request producers send and workers read.

A call travels through Redis as Celery's single positional argument, a JSON object::

    {"tool_id", "input", "env" | "env_sealed", "enqueued_at",   # always
     "config"?,                                           # per-call tool config override
     "timeout"?,                                          # per-call soft limit, seconds
     "retry"?: {"max_attempts"?, "enabled"?},             # per-call retry overrides
     "priority"?: 0..9,                                   # 9 most urgent; default 0
     "cache"?: false,                                     # bypass the tool's result cache
     "attempt"?, "history"?,                              # added by workers on retries
     "rate_token_at"?, "waits"?}                          # added by flow control

:meth:`CallRequest.to_message` and :meth:`CallRequest.from_message` are its only
encoder and decoder, and :func:`validate` its only rule book: the producer runs it
before enqueueing (so a bad call fails at the call site) and the worker runs it
again, because a message may come from anywhere. With the tool's Compozy definition
(from the settings) it merges ``with`` under the input and checks the input schema.
With a secret key configured (:mod:`toolq.sealing`) the env travels as one Fernet
token, ``"env_sealed"``, and a worker refuses a plain one.

A **chunk** (``ToolClient.map``) carries many calls in one Celery message, each with the
id its result is stored under: ``[{"id": CALL_ID, "call": <message above>}, ...]``
(:func:`chunk_to_message`, :func:`chunk_from_message`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from toolq.config.durations import format_duration, parse_duration
from toolq.config.settings import Settings
from toolq.errors import InvalidInput
from toolq.sealing import Sealer, env_fields, open_env
from toolq.validation import check_input_size, json_size, validate_env, validate_tool_id

_INPUT_PREVIEW = 200
MAX_PRIORITY = 9
"""Priorities run 0 (the default) to 9 (the most urgent)."""


@dataclass(frozen=True)
class CallRequest:
    """One tool invocation as queued: what to run, with what, and how it went so far."""

    tool_id: str
    input: Any = None
    env: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] | None = None
    """Overrides the tool's definition ``config`` key by key (its second argument)."""
    enqueued_at: float = 0.0
    """When the call was first enqueued (producer's clock): retries count from here."""
    timeout_s: float | None = None
    """The caller's own soft limit, replacing the tool's (never above the ceiling)."""
    max_attempts: int | None = None
    retry: bool = True
    attempt: int = 1
    history: tuple[Mapping[str, Any], ...] = ()
    """One entry per earlier attempt or deferral: kind, name, message, delay, worker, at."""
    counted: bool = False
    """An earlier attempt already counted against the tool's breaker (once per call)."""
    env_sealed: str | None = None
    """The token the env arrived sealed in: passed on as it is (retries, dead letters)."""
    priority: int | None = None
    """0..9, 9 the most urgent; None is 0 (docs/flow-control.md)."""
    cache: bool = True
    """False: run the tool even if its result cache holds an answer (and do not store one)."""
    rate_token_at: float | None = None
    """The call already holds the rate token of this time (it waited for it)."""
    waits: int = 0
    """How often flow control re-published the call (slot or rate token not yet free)."""

    # -- the Redis message ---------------------------------------------------------------

    def to_message(self, sealer: Sealer | None = None) -> dict[str, Any]:
        """The message; with a ``sealer`` (a secret key), the env goes sealed."""
        message: dict[str, Any] = {
            "tool_id": self.tool_id,
            "input": self.input,
            **env_fields(self.env, self.env_sealed, sealer),
            "enqueued_at": self.enqueued_at,
        }
        if self.config is not None:
            message["config"] = dict(self.config)
        if self.timeout_s is not None:
            message["timeout"] = self.timeout_s
        overrides: dict[str, Any] = {}
        if self.max_attempts is not None:
            overrides["max_attempts"] = self.max_attempts
        if not self.retry:
            overrides["enabled"] = False
        if overrides:
            message["retry"] = overrides
        if self.attempt != 1 or self.history:
            message["attempt"] = self.attempt
            message["history"] = [dict(entry) for entry in self.history]
        if self.counted:
            message["counted"] = True
        if self.priority is not None:
            message["priority"] = self.priority
        if not self.cache:
            message["cache"] = False
        if self.rate_token_at is not None:
            message["rate_token_at"] = self.rate_token_at
        if self.waits:
            message["waits"] = self.waits
        return message

    @classmethod
    def from_message(cls, message: Any, sealer: Sealer | None = None) -> CallRequest:
        """Read a message's structure; :class:`InvalidInput` for one that is not a call
        (or whose env is plain while this side has a ``sealer``, or will not open).

        Field rules (tool id, env, limits) are :func:`validate`'s."""
        if not isinstance(message, Mapping):
            raise InvalidInput("request must be a JSON object", "ValidationError")
        env, env_sealed = open_env(message, sealer)
        overrides = message.get("retry")
        overrides = {} if overrides is None else overrides
        if not isinstance(overrides, Mapping):
            raise InvalidInput("retry must be an object", "ValidationError")
        history = message.get("history")
        history = [] if history is None else history
        if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
            raise InvalidInput("history must be a list of objects", "ValidationError")
        enabled = overrides.get("enabled", True)
        counted = message.get("counted", False)
        attempt = message.get("attempt", 1)
        enqueued_at = message.get("enqueued_at", 0.0)
        if not isinstance(enabled, bool) or not isinstance(counted, bool):
            raise InvalidInput("retry.enabled and counted must be true or false", "ValidationError")
        if not _is_int(attempt) or attempt < 1:
            raise InvalidInput("attempt must be a positive integer", "ValidationError")
        if not _is_number(enqueued_at):
            raise InvalidInput("enqueued_at must be a number", "ValidationError")
        cache = message.get("cache", True)
        token_at = message.get("rate_token_at")
        waits = message.get("waits", 0)
        if not isinstance(cache, bool):
            raise InvalidInput("cache must be true or false", "ValidationError")
        if token_at is not None and not _is_number(token_at):
            raise InvalidInput("rate_token_at must be a number", "ValidationError")
        if not _is_int(waits) or waits < 0:
            raise InvalidInput("waits must be a non-negative integer", "ValidationError")
        return cls(
            tool_id=message.get("tool_id"),  # type: ignore[arg-type]  # checked by validate
            input=message.get("input"),
            env=env,
            config=message.get("config"),
            enqueued_at=float(enqueued_at),
            timeout_s=message.get("timeout"),
            max_attempts=overrides.get("max_attempts"),
            retry=enabled,
            attempt=attempt,
            history=tuple(history),
            counted=counted,
            env_sealed=env_sealed,
            priority=message.get("priority"),
            cache=cache,
            rate_token_at=None if token_at is None else float(token_at),
            waits=waits,
        )

    # -- what workers do with it ---------------------------------------------------------

    def next_attempt(
        self, entry: Mapping[str, Any], *, same_attempt: bool = False, counted: bool = False
    ) -> CallRequest:
        """The request for the call's next try, with ``entry`` added to its history
        (a deferral while the breaker is open keeps the attempt number)."""
        return replace(
            self,
            attempt=self.attempt if same_attempt else self.attempt + 1,
            history=(*self.history, {**entry, "at": time.time()}),
            counted=self.counted or counted,
            rate_token_at=None,  # a new attempt takes a rate token of its own
        )

    def describe(self) -> str:
        """What Flower and Celery's logs show: the tool id, a short input, env values hidden."""
        shown = json.dumps(self.input, separators=(",", ":"), default=str)
        if len(shown) > _INPUT_PREVIEW:
            shown = shown[:_INPUT_PREVIEW] + "…"
        env = {key: "***" for key in self.env}
        suffix = f", attempt={self.attempt}" if self.attempt > 1 else ""
        return f"({self.tool_id!r}, input={shown}, env={env}{suffix})"


def new_request(
    tool_id: str,
    input: Any = None,
    env: Mapping[str, str] | None = None,
    timeout: float | str | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    max_attempts: int | None = None,
    retry: bool = True,
    priority: int | None = None,
    cache: bool = True,
) -> CallRequest:
    """A request as a caller states it (durations as ``"30s"`` or seconds), not yet validated."""
    timeout_s: Any = timeout
    if isinstance(timeout, str):
        try:
            timeout_s = parse_duration(timeout)
        except ValueError as exc:
            raise InvalidInput(f"timeout: {exc}", "ValidationError") from None
    return CallRequest(
        tool_id=tool_id,
        input=input,
        env=env if env is not None else {},
        config=config,
        enqueued_at=time.time(),
        timeout_s=timeout_s,
        max_attempts=max_attempts,
        retry=retry,
        priority=priority,
        cache=cache,
    )


def validate(request: CallRequest, settings: Settings) -> CallRequest:
    """Everything a worker would refuse, refused: raise :class:`InvalidInput`, or return
    the request with its env checked and, for a tool with a Compozy definition, its
    input as the tool gets it (``with`` merged under it, the input schema satisfied).
    Producer and worker both call this, with their settings (and so definitions)."""
    validate_tool_id(request.tool_id)
    env = validate_env(request.env)
    if request.config is not None and not isinstance(request.config, Mapping):
        raise InvalidInput(
            "config must be an object (the tool's second argument)", "ValidationError"
        )
    if not isinstance(request.retry, bool):
        raise InvalidInput("retry must be true or false", "ValidationError")
    if request.max_attempts is not None and (
        not _is_int(request.max_attempts) or request.max_attempts < 1
    ):
        raise InvalidInput("max_attempts must be a positive integer", "ValidationError")
    if request.priority is not None and (
        not _is_int(request.priority) or not 0 <= request.priority <= MAX_PRIORITY
    ):
        raise InvalidInput(
            f"priority must be an integer from 0 to {MAX_PRIORITY} ({MAX_PRIORITY} most urgent)",
            "ValidationError",
        )
    if not isinstance(request.cache, bool):
        raise InvalidInput("cache must be true or false", "ValidationError")
    timeout_s = None
    if request.timeout_s is not None:
        timeout_s = _check_timeout(request.timeout_s, settings.max_hard_timeout_s)
    tool_input = request.input
    definition = settings.definition(request.tool_id)
    if definition is not None:
        tool_input = definition.effective_input(tool_input)
    size = json_size(tool_input) + json_size(env, "env") + json_size(request.config, "config")
    check_input_size(size)
    if definition is not None:
        definition.check_input(tool_input)
        if settings.tool(request.tool_id).lock_definition:
            _check_locked(request.tool_id, definition.config, definition.env, request.config, env)
    return replace(request, input=tool_input, env=env, timeout_s=timeout_s)


def _check_locked(
    tool_id: str,
    config: Mapping[str, Any],
    env: Mapping[str, str],
    call_config: Mapping[str, Any] | None,
    call_env: Mapping[str, str],
) -> None:
    """A tool with ``lock_definition``: refuse a call that overrides its definition's
    config keys or env names (naming them; no value is shown)."""
    keys = sorted(set(call_config or {}) & set(config))
    names = sorted(set(call_env) & set(env))
    if keys or names:
        what = [f"config {', '.join(keys)}"] if keys else []
        what += [f"env {', '.join(names)}"] if names else []
        raise InvalidInput(
            f"tool {tool_id} has lock_definition: a call may not override its definition's "
            f"{' and '.join(what)}",
            "ValidationError",
        )


MAX_CHUNK_CALLS = 1000
"""The most calls one chunk message may carry."""
MAX_CALL_ID = 200
"""The longest call id a chunk may name (uuid4 strings are 36)."""


@dataclass(frozen=True)
class ChunkEntry:
    """One call of a chunk: its id and its (still undecoded) message."""

    call_id: str
    message: Any


def chunk_to_message(entries: list[ChunkEntry]) -> list[dict[str, Any]]:
    return [{"id": entry.call_id, "call": entry.message} for entry in entries]


def chunk_from_message(value: Any) -> list[ChunkEntry]:
    """A chunk's calls; :class:`InvalidInput` if it is not one. Each call's own message is
    checked later, by :meth:`CallRequest.from_message` and :func:`validate`."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CHUNK_CALLS:
        raise InvalidInput(
            f"a chunk must be a list of 1 to {MAX_CHUNK_CALLS} calls", "ValidationError"
        )
    entries = []
    for item in value:
        call_id = item.get("id") if isinstance(item, Mapping) else None
        if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_CALL_ID:
            raise InvalidInput(
                f'every call of a chunk must be {{"id": a string of 1 to {MAX_CALL_ID} '
                'characters, "call": ...}',
                "ValidationError",
            )
        entries.append(ChunkEntry(call_id, item.get("call")))
    if len({entry.call_id for entry in entries}) != len(entries):
        raise InvalidInput("a chunk names the same call id twice", "ValidationError")
    return entries


def chunk_ids(value: Any) -> list[str]:
    """The call ids readable in a chunk that is not valid (to answer each caller)."""
    if not isinstance(value, list):
        return []
    ids = (item.get("id") for item in value[:MAX_CHUNK_CALLS] if isinstance(item, Mapping))
    return [i for i in ids if isinstance(i, str) and 0 < len(i) <= MAX_CALL_ID]


def _check_timeout(timeout: Any, ceiling_s: float) -> float:
    """Seconds (a message may also carry a duration string such as ``"30s"``)."""
    try:
        seconds = parse_duration(timeout)
    except ValueError as exc:
        raise InvalidInput(f"timeout: {exc}", "ValidationError") from None
    if not 0 < seconds <= ceiling_s:
        raise InvalidInput(
            f"timeout {format_duration(seconds)} is outside (0, {format_duration(ceiling_s)}]: "
            "a call may not outlast the longest configured hard limit (raise runtime.timeout "
            "or the tool's timeout)",
            "ValidationError",
        )
    return seconds


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
