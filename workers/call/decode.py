"""Step 1, decode: read and validate the message once, then look up what the tool's
profile makes of it (retry policy with the call's overrides, deadline).

A message that is not a valid call ends here as ``invalid_input``; nothing later reads
the raw message again, except :mod:`.finish` for what it can keep of a refused one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from toolq.config.settings import Settings
from toolq.errors import InvalidInput, ToolFailure
from toolq.protocol import CallRequest, validate
from toolq.sealing import Sealer
from toolq.workers.call.attempt import Attempt, Ended, Received
from toolq.workers.profile import Profiles
from toolq.workers.runtime.base import failed


def decode(
    received: Received, settings: Settings, profiles: Profiles, sealer: Sealer | None
) -> Attempt | Ended:
    """The attempt in hand, or the end of a message that is not a valid call."""
    try:
        request = validate(CallRequest.from_message(received.message, sealer), settings)
    except InvalidInput as refused:
        return Ended(failed(refused))
    profile = profiles[request.tool_id]
    policy = profile.retry.overridden(
        max_attempts=request.max_attempts, enabled=None if request.retry else False
    )
    deadline = (request.enqueued_at or received.started_at) + policy.max_elapsed_s
    return Attempt(received, request, profile, policy, deadline)


def decode_leniently(message: Any, sealer: Sealer | None) -> CallRequest | None:
    """The request as far as its structure reads (not validated): enough to end a call
    that Celery's backstop stopped, whatever it was."""
    try:
        return CallRequest.from_message(message, sealer)
    except ToolFailure:
        return None


def raw_field(message: Any, key: str, default: Any = "") -> Any:
    """A field of a message that could not be decoded, as far as it can be read."""
    if not isinstance(message, Mapping):
        return default
    value = message.get(key, default)
    return str(value) if key == "tool_id" else value
