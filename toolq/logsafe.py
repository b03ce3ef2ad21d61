"""Log lines that untrusted values cannot forge.

A worker logs values it did not choose: tool ids and call ids read from messages anyone
with Redis access can write, queue names, reasons quoting a message, a tool's stderr.
Written raw, a tool id ``"x\\n[2026-…: WARNING/MainProcess] all good"`` starts a second,
forged log line, and terminal escapes rewrite what an operator sees.

One boundary: :func:`install` puts :class:`EscapeArgs` on the worker's loggers (toolq's
and Celery's that name tasks), and it escapes every string argument of every record
(``%s`` arguments, not the format string, which is toolq's own): control characters
become ``\\n``, ``\\x1b``, ``\\u2028``… so each record stays one line. Text that is meant
to span lines (a tool's stderr) is passed as :class:`Block`: each line is escaped and
indented under a ``|`` gutter, so it can never look like a log line of its own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
WORKER_LOGGERS = (
    "toolq.worker",
    "toolq.tool",
    "toolq.slow",
    "toolq.presence",  # queue names
    "celery.worker.strategy",  # "Task toolq:<tool id>[<id>] received"
    "celery.app.trace",
    "celery.worker.request",
)
"""The loggers that write values read from messages or from tools."""


def escape(value: object) -> str:
    """``value`` as text on one line, its control characters escaped."""
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


class Block:
    """Multi-line text for a log record: each line escaped, indented under ``  | ``."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return "\n".join(f"  | {escape(line)}" for line in self.text.splitlines())


class EscapeArgs(logging.Filter):
    """Escapes a record's arguments (positional or named) in place; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_safe(arg) for arg in args)
        elif isinstance(args, Mapping):
            record.args = {key: _safe(value) for key, value in args.items()}
        return True


class _Shown:
    """Any other argument (an exception, a path): escaped however the format shows it."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape(str(self.value))

    def __repr__(self) -> str:
        return escape(repr(self.value))


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return escape(value)
    if value is None or isinstance(value, int | float | Block | _Shown):
        return value  # numbers keep %d and %.3f working
    return _Shown(value)


_FILTER = EscapeArgs()


def install(names: tuple[str, ...] = WORKER_LOGGERS) -> None:
    """Escape the arguments of every record these loggers write (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
