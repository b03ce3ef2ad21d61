"""Signed calls: a worker runs only a call that a holder of its project's key sent.

Anyone who can write to Redis can put a message on a queue; without a signature a worker
cannot tell a producer's call from a forged one (a hostile tool's, another project's).
With a secret key (the one that seals env, :mod:`toolq.sealing`: ``TOOLQ_SECRET_KEY`` or
``secret_key_file``) every call message carries ``toolq_sig``, an HMAC-SHA256 over the
whole request — the task, the call id, the queue, the project and the complete argument
(tool id, input, env or its sealed token, config, options, attempt and history) — in
one canonical JSON form. A worker with a key checks it before anything else reads the
message (:mod:`toolq.workers.poison`): a missing or bad signature makes the message
poison (acknowledged, dead-lettered, answered, never run).

The HMAC key is derived from each Fernet key (never the Fernet key itself), so one key
per project does both jobs and rotates once: keys are comma-separated, the first signs,
every one verifies; put the new key first on every worker, then on the producers, and
drop the old one once nothing it signed is left on the queues (retries re-signed by a
worker carry the first key).

The project is in the signed data, so a message signed for project alpha does not verify
on beta's worker even if the two share a key, and a signed message moved to another queue
does not verify either. Chunks (``toolq.run_batch``) are signed as one message; a
worker re-signs what it re-sends (retries, a chunk's remainder), as it holds the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from toolq.config.settings import Settings
from toolq.errors import ConfigError
from toolq.sealing import key_text

SIGNATURE_HEADER = "toolq_sig"
"""The Celery message header holding a call's signature."""
PROJECT_HEADER = "toolq_project"
"""The project a producer signed for (not trusted: it only makes refusals readable)."""
VERSION = "v1"
_DERIVE = b"toolq call signature v1"


class Signer:
    """Signs and verifies call messages with one project's key(s)."""

    def __init__(self, keys: str, project: str | None) -> None:
        parts = [part.strip() for part in keys.split(",") if part.strip()]
        if not parts:
            raise ConfigError("secret_key: no key given", key="secret_key")
        self._keys: list[bytes] = []
        for number, part in enumerate(parts, 1):
            try:
                raw = base64.urlsafe_b64decode(part.encode("ascii"))
            except (binascii.Error, ValueError, UnicodeEncodeError):
                raw = b""
            if len(raw) != 32:  # Never the key itself in the message (see sealing).
                raise ConfigError(
                    f"secret_key: key {number} of {len(parts)} is not a Fernet key (32 "
                    "url-safe base64-encoded bytes; `toolq keygen` prints a new one)",
                    key="secret_key",
                )
            self._keys.append(hmac.new(raw, _DERIVE, hashlib.sha256).digest())
        self.project = project or ""

    def __repr__(self) -> str:
        return f"Signer(project={self.project!r}, ***)"

    def sign(self, task: str, call_id: str, queue: str, argument: Any) -> str:
        """The signature of one message (the first key's)."""
        return _mac(self._keys[0], _canonical(task, call_id, queue, self.project, argument))

    def check(self, task: str, call_id: str, queue: str, argument: Any, headers: Any) -> str | None:
        """Why the message's signature does not hold (None: it does), without secrets."""
        headers = headers if isinstance(headers, dict) else {}
        signature = headers.get(SIGNATURE_HEADER)
        if signature is None:
            return (
                "unsigned call refused: this worker has a secret key, so it runs only calls "
                "signed with its project's key (give the producer the same TOOLQ_SECRET_KEY)"
            )
        if not isinstance(signature, str):
            return "call signature refused: it is not a string"
        try:
            data = _canonical(task, call_id, queue, self.project, argument)
        except (TypeError, ValueError, RecursionError):
            return "call signature refused: the message is not plain JSON"
        given = signature.encode("utf-8", "replace")
        if any(hmac.compare_digest(_mac(key, data).encode(), given) for key in self._keys):
            return None
        claimed = headers.get(PROJECT_HEADER)
        if isinstance(claimed, str) and claimed != self.project:
            return (
                f"call signature refused: the call was sent for {_project(claimed)}, this "
                f"worker serves {_project(self.project)}; a worker runs only its own "
                "project's calls"
            )
        return (
            f"call signature refused: not signed with {_project(self.project)}'s key for "
            "this call and queue (a different key, a key rotated out, or a message forged "
            "or altered in Redis)"
        )

    def headers(self, task: str, call_id: str, queue: str, argument: Any) -> dict[str, str]:
        """The message headers that carry the signature."""
        return {
            SIGNATURE_HEADER: self.sign(task, call_id, queue, argument),
            PROJECT_HEADER: self.project,
        }


def _project(name: str) -> str:
    """A project as a refusal names it (a claimed name is the sender's: kept short)."""
    return f"project {name[:100]!r}" if name else "the unnamed project"


def _mac(key: bytes, data: bytes) -> str:
    return f"{VERSION}:{hmac.new(key, data, hashlib.sha256).hexdigest()}"


def _canonical(task: str, call_id: str, queue: str, project: str, argument: Any) -> bytes:
    """One byte string per message, the same on both sides of Redis (sorted keys, no
    spaces, ASCII): JSON read back and written again gives the same bytes."""
    payload = [VERSION, task, call_id, queue, project, argument]
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True
    ).encode("ascii")


def load_signer(settings: Settings) -> Signer | None:
    """The signer of the settings' project and key (None: no key, calls go unsigned).

    Raises :class:`ConfigError` for an unreadable key file or a malformed key."""
    keys = key_text(settings)
    return None if keys is None else Signer(keys, settings.project)
