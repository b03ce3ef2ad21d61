"""Checks made before Bun is spawned, as Compozy makes them (and a few size bounds).

Producers run the same checks before enqueueing, so bad calls fail at the call
site; workers run them again because a message may come from anywhere.
"""

from __future__ import annotations

import json
import posixpath
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from toolq.errors import InvalidInput

TOOL_ID = re.compile(r"^[a-zA-Z0-9_/.-]+$")
ENV_KEY = re.compile(r"^[A-Z0-9_]+$")
FORBIDDEN_ENV_KEYS = frozenset(
    {
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "DYLD_INSERT_LIBRARIES",
        "DYLD_LIBRARY_PATH",
        "NODE_OPTIONS",
        "BUN_CONFIG_PROFILE",
    }
)
MAX_TOOL_ID_LENGTH = 256
MAX_JSON_DEPTH = 100
"""Deeper input is refused: no real tool input nests this far, and a deep enough one
would exhaust the recursion of every JSON codec on its way (Python's, kombu's)."""
MAX_INPUT_BYTES = 10 * 1024 * 1024
"""A request (input, config, env) larger than this is refused before anything runs."""


def validate_tool_id(tool_id: Any) -> str:
    if not isinstance(tool_id, str) or not tool_id:
        raise InvalidInput("tool id must be a non-empty string", "ValidationError")
    if len(tool_id) > MAX_TOOL_ID_LENGTH:
        raise InvalidInput(
            f"tool id longer than {MAX_TOOL_ID_LENGTH} characters", "ValidationError"
        )
    if not TOOL_ID.fullmatch(tool_id):
        raise InvalidInput(
            f"invalid tool id {tool_id!r}: use letters, digits, '_', '/', '.', '-'",
            "ValidationError",
        )
    if ".." in tool_id or tool_id.startswith(("/", ".")):
        raise InvalidInput(
            f"invalid tool id {tool_id!r}: no '..' and no leading '/' or '.'", "ValidationError"
        )
    if posixpath.normpath(tool_id) != tool_id or unicodedata.normalize("NFC", tool_id) != tool_id:
        raise InvalidInput(f"invalid tool id {tool_id!r}: not in canonical form", "ValidationError")
    return tool_id


def validate_env(env: Any) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidInput("env must be a mapping of names to strings", "ValidationError")
    checked: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_KEY.fullmatch(key):
            raise InvalidInput(f"invalid env name {key!r}: use A-Z, 0-9 and '_'", "ValidationError")
        if key in FORBIDDEN_ENV_KEYS:
            raise InvalidInput(f"env name {key} is not allowed", "ValidationError")
        if not isinstance(value, str):
            raise InvalidInput(f"env {key} must be a string", "ValidationError")
        if any(ch in value for ch in "\r\n\x00"):
            raise InvalidInput(f"env {key} must not contain CR, LF or NUL", "ValidationError")
        checked[key] = value
    return checked


def check_input_size(size: int, limit: int = MAX_INPUT_BYTES) -> None:
    if size > limit:
        raise InvalidInput(
            f"input is {size} bytes, over the limit of {limit} bytes", "InputTooLarge"
        )


def json_size(value: Any, what: str = "input") -> int:
    """Bytes of ``value`` as compact JSON; :class:`InvalidInput` if it is not JSON (NaN,
    objects, non-string keys) or nests deeper than :data:`MAX_JSON_DEPTH`."""
    check_depth(value, what)
    try:
        return len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}", "ParseError") from None


def check_depth(value: Any, what: str = "input", limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse nesting deeper than ``limit``, without recursion (so a deep value cannot
    blow the stack while being checked)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            raise InvalidInput(f"{what} nests deeper than {limit} levels", "ValidationError")
        stack.extend((child, depth + 1) for child in children)
