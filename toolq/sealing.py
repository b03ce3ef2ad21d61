"""Sealed env: a call's env encrypted from the producer to the worker and at rest.

Without a key a call's env crosses Redis as plain JSON: anyone who can read Redis (a
replica, a backup, ``MONITOR``, an AOF file) reads every caller's secrets. With one
(``TOOLQ_SECRET_KEY``, or ``secret_key_file``), the producer sends the env as one
Fernet token (``"env_sealed"`` instead of ``"env"``), the worker opens it in memory
only, and the dead-letter list keeps the token, never the values. Fernet (AES-128-CBC
with an HMAC-SHA256, from ``cryptography``) also authenticates: a token altered in
Redis does not open.

Keys are comma-separated: the first seals, every one opens (:class:`MultiFernet`), so
a key is rotated by putting the new one first and dropping the old one once nothing
sealed with it is left (queues drained, dead letters replayed or purged).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from toolq.config.settings import Settings
from toolq.errors import ConfigError, InvalidInput

SEALED_FIELD = "env_sealed"


class Sealer:
    """Seals and opens env mappings with one or more Fernet keys."""

    def __init__(self, keys: str) -> None:
        parts = [part.strip() for part in keys.split(",") if part.strip()]
        if not parts:
            raise ConfigError("secret_key: no key given", key="secret_key")
        fernets = []
        for number, part in enumerate(parts, 1):
            try:
                fernets.append(Fernet(part))
            except ValueError:
                # Never the key itself in the message: it may be a real one, mistyped.
                raise ConfigError(
                    f"secret_key: key {number} of {len(parts)} is not a Fernet key (32 "
                    "url-safe base64-encoded bytes; `toolq keygen` prints a new one)",
                    key="secret_key",
                ) from None
        self._fernet = MultiFernet(fernets)

    def __repr__(self) -> str:
        return "Sealer(***)"

    def seal(self, env: Any) -> str:
        data = json.dumps(env, separators=(",", ":"), default=str).encode()
        return self._fernet.encrypt(data).decode("ascii")

    def unseal(self, token: Any) -> Any:
        """The env inside ``token``; :class:`InvalidInput` if these keys cannot open it."""
        if not isinstance(token, str):
            raise InvalidInput("env_sealed must be a string (a Fernet token)", "ValidationError")
        try:
            return json.loads(self._fernet.decrypt(token.encode("ascii", "replace")))
        except (InvalidToken, ValueError):
            raise InvalidInput(
                "env_sealed cannot be opened with this worker's secret_key (a different "
                "key, a key rotated out, or a token altered in transit)",
                "ValidationError",
            ) from None


def load_sealer(settings: Settings) -> Sealer | None:
    """The sealer the settings configure (``secret_key`` > ``secret_key_file``), or None.

    Raises :class:`ConfigError` for an unreadable file or a malformed key."""
    keys = key_text(settings)
    return None if keys is None else _sealer(keys)


def key_text(settings: Settings) -> str | None:
    """The project's secret key(s) as configured (``secret_key`` > ``secret_key_file``),
    or None: the one key that seals env and signs calls (:mod:`toolq.signing`).

    Raises :class:`ConfigError` for an unreadable file."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    if settings.secret_key_file is None:
        return None
    path = settings.project_dir / Path(settings.secret_key_file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"secret_key_file: cannot read {path}: {exc.strerror}", key="secret_key_file"
        ) from None
    return text.strip()


@functools.lru_cache(maxsize=8)
def _sealer(keys: str) -> Sealer:
    return Sealer(keys)


def env_fields(env: Any, token: str | None, sealer: Sealer | None) -> dict[str, Any]:
    """A message's (or a dead letter's) env fields: the token as it came, a new token
    with a key, or the plain mapping without one (an empty env is never sealed)."""
    if token is not None:
        return {SEALED_FIELD: token}
    if sealer is not None and env:
        return {SEALED_FIELD: sealer.seal(env)}
    return {"env": dict(env) if isinstance(env, Mapping) else env}


def open_env(message: Mapping[str, Any], sealer: Sealer | None) -> tuple[Any, str | None]:
    """A message's env and the token it came sealed in (None: it came plain).

    A worker with a key refuses a plain env: a producer without the key would otherwise
    put secrets on Redis in the clear with nobody noticing."""
    token = message.get(SEALED_FIELD)
    plain = message.get("env") or {}
    if token is None:
        if sealer is not None and plain:
            raise InvalidInput(
                "plain env refused: this worker has a secret_key (TOOLQ_SECRET_KEY), so a "
                "call's env must arrive sealed; give the producer the same key",
                "ValidationError",
            )
        return plain, None
    if plain:
        raise InvalidInput("a call carries env or env_sealed, not both", "ValidationError")
    if sealer is None:
        raise InvalidInput(
            "env is sealed but this worker has no secret_key: set TOOLQ_SECRET_KEY (the "
            "producer's key) on the worker",
            "ValidationError",
        )
    return sealer.unseal(token), token
