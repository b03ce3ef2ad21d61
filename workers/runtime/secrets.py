"""Keep a call's env values out of everything toolq stores or logs."""

from __future__ import annotations

from collections.abc import Mapping


def redact_secrets(text: str, env: Mapping[str, str]) -> str:
    """Replace every env value of three characters or more with ``***``."""
    for value in sorted(env.values(), key=len, reverse=True):
        if len(value) >= 3:
            text = text.replace(value, "***")
    return text
