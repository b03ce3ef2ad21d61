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
from typing import Any

import ahocorasick

from toolq.envelope import ToolErrorInfo
from toolq.workers.runtime.base import Outcome

MASK = "***"
MIN_SUBSTRING = 3
"""Values at least this long are redacted anywhere; shorter ones as whole tokens only."""


def redact_secrets(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every env value replaced by ``***``, in time linear in ``text``
    (one Aho-Corasick pass, however many values: a regex alternation of every value
    took minutes over a 3 MB message and 10,000 values)."""
    if not text or not env:
        return text
    matcher = _matcher(tuple(sorted(set(env.values()))))
    return text if matcher is None else matcher.redact(text)


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


class _Matcher:
    """Every form of every value: those of long values replaced anywhere (leftmost,
    longest first, so a value that contains another is replaced whole), those of short
    ones only as whole tokens, looked for after the long ones are masked (so next to a
    mask a short value may be hidden where it touched a letter before: more, never less)."""

    def __init__(self, anywhere: list[str], tokens: list[str]) -> None:
        self.anywhere = _automaton(anywhere)
        self.tokens = _automaton(tokens)

    def redact(self, text: str) -> str:
        for automaton, whole in ((self.anywhere, False), (self.tokens, True)):
            if automaton is None:
                continue
            pieces, done = [], 0
            for end, length in automaton.iter_long(text):
                start = end - length + 1
                if whole and not _alone(text, start, end + 1):
                    continue
                pieces += [text[done:start], MASK]
                done = end + 1
            if pieces:
                text = "".join(pieces) + text[done:]
        return text


def _automaton(forms: list[str]) -> Any:
    if not forms:
        return None
    automaton = ahocorasick.Automaton()
    for form in forms:
        automaton.add_word(form, len(form))
    automaton.make_automaton()
    return automaton


def _alone(text: str, start: int, end: int) -> bool:
    r"""Not next to a letter, digit or ``_`` (the regex ``(?<!\w)…(?!\w)``)."""
    before = text[start - 1] if start > 0 else ""
    after = text[end] if end < len(text) else ""
    return not (_WORD.match(before) or _WORD.match(after))


_WORD = re.compile(r"\w")


@functools.lru_cache(maxsize=256)
def _matcher(values: tuple[str, ...]) -> _Matcher | None:
    """The matcher for these values. Values of only ``*`` are skipped: they are the mask
    itself, and redacting twice must change nothing."""
    forms: dict[str, bool] = {}  # form -> whole tokens only
    for value in values:
        if not value.strip("*"):
            continue
        short = len(value) < MIN_SUBSTRING
        for form in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
            forms[form] = forms.get(form, True) and short
    if not forms:
        return None
    return _Matcher(
        [form for form, whole in forms.items() if not whole],
        [form for form, whole in forms.items() if whole],
    )
