"""Keep a call's env values out of everything toolq stores or logs.

Applied to a call's stderr and to every text field of its error (``message``,
``name``, ``stack``, the stderr tail), so a tool that throws or prints a secret has it
replaced by ``***`` in the envelope, the attempt history, the dead letter and the log.

- Values of :data:`MIN_SUBSTRING` characters or more are replaced wherever they occur.
- Shorter values (``"1"``, ``"ab"``) are replaced only as whole tokens (not next to a
  letter, digit or ``_``): replacing every ``a`` would destroy the output while hiding
  nothing, and a one-character secret is no secret. ``ab`` goes in ``key=ab`` but not
  in ``table``.
- Each value is also looked for as it appears inside a JSON string (quotes, backslashes
  and non-ASCII escaped), the form in which tools most often print it.

What redaction cannot do: find a value the tool transformed (base64, hex, reversed,
split, URL-encoded, hashed), or a value in a tool's *successful result*, which is the
tool's own business and is stored as returned.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping

from toolq.envelope import ToolErrorInfo
from toolq.workers.runtime.base import Outcome

MASK = "***"
MIN_SUBSTRING = 3
"""Values at least this long are redacted anywhere; shorter ones as whole tokens only."""


def redact_secrets(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every env value replaced by ``***``."""
    if not text or not env:
        return text
    pattern = _pattern(tuple(sorted(set(env.values()))))
    return text if pattern is None else pattern.sub(MASK, text)


def redact_error(error: ToolErrorInfo, env: Mapping[str, str]) -> ToolErrorInfo:
    """The error with env values removed from every text it carries."""
    return dataclasses.replace(
        error,
        message=redact_secrets(error.message, env),
        name=redact_secrets(error.name, env),
        stack=redact_secrets(error.stack, env) if error.stack else error.stack,
        stderr=redact_secrets(error.stderr, env) if error.stderr else error.stderr,
    )


def redact_outcome(outcome: Outcome, env: Mapping[str, str]) -> Outcome:
    """The outcome with its error and stderr redacted; the result is left as the tool
    returned it."""
    if not env or (outcome.error is None and not outcome.stderr):
        return outcome
    return dataclasses.replace(
        outcome,
        error=redact_error(outcome.error, env) if outcome.error is not None else None,
        stderr=redact_secrets(outcome.stderr, env),
    )


@functools.lru_cache(maxsize=256)
def _pattern(values: tuple[str, ...]) -> re.Pattern[str] | None:
    """One alternation of every form of every value, longest first (so a value that
    contains another is replaced whole). Values of only ``*`` are skipped: they are
    the mask itself, and redacting twice must change nothing."""
    forms: dict[str, bool] = {}  # form -> whole tokens only
    for value in values:
        if not value.strip("*"):
            continue
        short = len(value) < MIN_SUBSTRING
        for form in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
            forms[form] = forms.get(form, True) and short
    if not forms:
        return None
    parts = [
        rf"(?<!\w){re.escape(form)}(?!\w)" if whole else re.escape(form)
        for form, whole in sorted(forms.items(), key=lambda item: -len(item[0]))
    ]
    return re.compile("|".join(parts))
