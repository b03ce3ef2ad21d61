"""Checks made before Bun is spawned, as Compozy makes them (and a few size bounds).

Producers run the same checks before enqueueing, so bad calls fail at the call
site; workers run them again because a message may come from anywhere.
"""

from __future__ import annotations

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
MAX_INPUT_BYTES = 10 * 1024 * 1024
"""A request (input, config, env) larger than this is refused before anything runs."""


def validate_tool_id(tool_id: Any) -> str:
    if not isinstance(tool_id, str) or not tool_id:
        raise InvalidInput("tool id must be a non-empty string", "ValidationError")
    if len(tool_id) > MAX_TOOL_ID_LENGTH:
        raise InvalidInput(
            f"tool id longer than {MAX_TOOL_ID_LENGTH} characters", "ValidationError"
        )
    if not TOOL_ID.match(tool_id):
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
        if not isinstance(key, str) or not ENV_KEY.match(key):
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
