"""The result envelope: what a worker stores and what a caller gets back.

Workers build it, producers read it; both import this module so the wire shape
is defined once::

    {"id", "tool_id", "status": "success"|"error", "result", "error", "metadata"}

``error`` is ``{"kind", "name", "message", "stack"}`` (plus ``stderr`` for
crashes). ``metadata`` holds at least ``tool_exec_id``, ``execution_time``
(integer ms), ``attempts`` and ``worker``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from toolq.errors import FAILURE_CLASSES, ToolError, ToolFailure


def normalize_result(value: Any) -> dict[str, Any]:
    """Compozy's normalisation: objects as they are, ``None`` as ``{}``, anything else wrapped."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    return {"value": value}


@dataclass(frozen=True)
class ToolErrorInfo:
    """Why a call failed. ``kind`` is one of :data:`toolq.errors.FAILURE_CLASSES`."""

    kind: str
    message: str
    name: str = "Error"
    stack: str | None = None
    stderr: str | None = None
    retryable_hint: bool | None = None
    """A thrown error's own ``retryable`` property, when the tool set one."""

    @classmethod
    def from_failure(cls, failure: ToolFailure, stderr: str | None = None) -> ToolErrorInfo:
        return cls(
            kind=failure.kind,
            message=failure.message,
            name=failure.name,
            stack=failure.stack,
            stderr=stderr,
        )

    @property
    def retryable(self) -> bool:
        """Whether retrying may help: the kind's default, or a thrown error's own say."""
        if self.kind == ToolError.kind and self.retryable_hint is not None:
            return self.retryable_hint
        failure_class = FAILURE_CLASSES.get(self.kind)
        return bool(failure_class and failure_class.retryable) and self.retryable_hint is not False

    def to_exception(self) -> ToolFailure:
        failure_class = FAILURE_CLASSES.get(self.kind, ToolFailure)
        return failure_class(self.message, self.name, self.stack)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "message": self.message,
            "stack": self.stack,
        }
        if self.stderr:
            data["stderr"] = self.stderr
        if self.retryable_hint is not None:
            data["retryable"] = self.retryable_hint
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolErrorInfo:
        return cls(
            kind=str(data.get("kind") or "tool_error"),
            message=str(data.get("message", "")),
            name=str(data.get("name") or "Error"),
            stack=data.get("stack"),
            stderr=data.get("stderr"),
            retryable_hint=hint if isinstance(hint := data.get("retryable"), bool) else None,
        )


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call: ``ok`` with a ``result``, or an ``error``."""

    id: str
    tool_id: str
    result: dict[str, Any] | None = None
    error: ToolErrorInfo | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        return "success" if self.ok else "error"

    def raise_for_error(self) -> ToolResult:
        """Raise the :class:`~toolq.errors.ToolFailure` leaf for this error; return self if ok."""
        if self.error is not None:
            raise self.error.to_exception()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tool_id": self.tool_id,
            "status": self.status,
            "result": self.result,
            "error": self.error.to_dict() if self.error else None,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def failed(
        cls,
        call_id: str,
        tool_id: str,
        failure: ToolFailure,
        metadata: Mapping[str, Any] | None = None,
    ) -> ToolResult:
        """A failed call's envelope, for failures found outside a tool run."""
        base = {"tool_id": tool_id, "tool_exec_id": call_id, "attempts": 1, "execution_time": 0}
        return cls(
            call_id,
            tool_id,
            error=ToolErrorInfo.from_failure(failure),
            metadata={**base, **(metadata or {})},
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolResult:
        error = data.get("error")
        return cls(
            id=str(data["id"]),
            tool_id=str(data["tool_id"]),
            result=data.get("result"),
            error=ToolErrorInfo.from_dict(error) if error else None,
            metadata=dict(data.get("metadata") or {}),
        )
