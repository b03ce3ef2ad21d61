"""How long redacting a failed call's text takes, with many env values (issue 29, item 4).

    .venv/bin/python bench/investigations/redaction_cost.py

Redaction runs over a failed call's error message, stack and stderr with every value of
the call's env. Prints milliseconds for a text of TEXT_MB with N random values (the cap
is 128 names since issue 29; 10,000 shows the time no longer grows with them)."""

from __future__ import annotations

import secrets
import time

from toolq.workers.runtime.secrets import _matcher, redact_secrets

TEXT_MB = 3


def main() -> None:
    text = "".join(secrets.token_urlsafe(48) + " " for _ in range(TEXT_MB * 2**20 // 65))
    for count in (1, 128, 10_000):
        env = {f"K{i}": secrets.token_urlsafe(24) for i in range(count)}
        env["K0"] = text[1000:1032]  # one value that does occur
        _matcher.cache_clear()
        started = time.perf_counter()
        redacted = redact_secrets(text, env)
        elapsed = time.perf_counter() - started
        assert "***" in redacted
        print(f"{count:>6} values, {len(text) / 2**20:.1f} MB text: {elapsed * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
