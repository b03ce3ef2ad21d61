"""Issue 29's pure parts: the depth bound read from JSON text, and redaction by one
Aho-Corasick pass (the same answers as the regular expression it replaced)."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from toolq.validation import check_depth, text_nests_deeper
from toolq.workers.runtime.secrets import MASK, MIN_SUBSTRING, redact_secrets


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _random_json(rng: random.Random, depth: int) -> Any:
    if depth == 0 or rng.random() < 0.2:
        return rng.choice([1, "s", 'q"[{\\', "]}", None, 2.5, "\\\\[", "ünï[cödé"])
    if rng.random() < 0.5:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}[": _random_json(rng, depth - 1) for i in range(rng.randint(0, 3))}


@pytest.mark.parametrize("seed", range(300))
def test_text_depth_agrees_with_the_parsed_depth(seed: int) -> None:
    rng = random.Random(seed)
    value = _random_json(rng, rng.randint(0, 12))
    for ensure_ascii in (True, False):
        text = json.dumps(value, ensure_ascii=ensure_ascii).encode()
        for limit in range(0, 10):
            assert text_nests_deeper(text, limit) == (_depth(value) > limit), (text, limit)


def test_depth_of_a_bomb_is_found_without_recursion() -> None:
    assert text_nests_deeper(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    assert not text_nests_deeper(b"[" * 100 + b"]" * 100)
    with pytest.raises(ValueError):
        check_depth(json.loads("[" * 101 + "]" * 101))


def _regex_redact(text: str, env: dict[str, str]) -> str:
    """The regular expression the matcher replaced (its semantics are the contract)."""
    forms: dict[str, bool] = {}
    for value in sorted(set(env.values())):
        if not value.strip("*"):
            continue
        short = len(value) < MIN_SUBSTRING
        for form in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
            forms[form] = forms.get(form, True) and short
    if not forms:
        return text
    parts = [
        rf"(?<!\w){re.escape(form)}(?!\w)" if whole else re.escape(form)
        for form, whole in sorted(forms.items(), key=lambda item: -len(item[0]))
    ]
    return re.compile("|".join(parts)).sub(MASK, text)


@pytest.mark.parametrize("seed", range(300))
def test_redaction_agrees_with_the_regular_expression(seed: int) -> None:
    """Values of 3+ characters: the same text as the regex. With short values (whole
    tokens only) too, next to a mask the matcher may hide a little more (the regex
    looked at the original neighbours in one pass), never less: no long value stays."""
    rng = random.Random(seed)
    alphabet = 'ab_ "\\é1-'
    env = {
        f"K{i}": "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        for i in range(rng.randint(1, 4))
    }
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    text += json.dumps(list(env.values()))
    long_only = {k: v for k, v in env.items() if len(v) >= MIN_SUBSTRING}
    assert redact_secrets(text, long_only) == _regex_redact(text, long_only), (text, long_only)
    redacted = redact_secrets(text, env)
    for value in long_only.values():
        if value.strip("*"):
            assert value not in redacted, (text, env, redacted)
