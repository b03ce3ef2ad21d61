"""Per-tool settings resolved once into a typed, frozen :class:`ToolProfile`.

Precedence, with explicit ``is None`` checks: call > tool (``tools.<id>``) > runtime
or top level > default. The worker asks :class:`Profiles` once per tool id and keeps
the answer; nothing downstream sees a dict or a ``""`` meaning "the default".

A tool's Compozy definition rides along: its ``config`` (the call's ``config``
overrides it key by key), its ``env`` (templates resolved from the worker's
environment per call, never kept resolved) and its output schema.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from toolq.config.settings import (
    BreakerSettings,
    LimitSettings,
    RetrySettings,
    Settings,
    TimeLimits,
)
from toolq.config.tooldefs import ToolDefinition
from toolq.envelope import ToolErrorInfo
from toolq.errors import InvalidOutput
from toolq.protocol import CallRequest
from toolq.validation import validate_env
from toolq.workers.backoff import RetryPolicy
from toolq.workers.flow import FlowLimits
from toolq.workers.grants import with_grant_hint
from toolq.workers.runtime.base import Call, Mode, Outcome
from toolq.workers.runtime.limits import ResourceLimits
from toolq.workers.runtime.sandbox import Permissions


@dataclass(frozen=True)
class ToolProfile:
    """Everything the worker needs to know about running one tool."""

    tool_id: str
    time_limits: TimeLimits
    resources: ResourceLimits
    permissions: Permissions
    retry: RetryPolicy
    breaker: BreakerSettings
    mode: Mode
    """warm only where the worker runs warm processes and the tool shares their sandbox."""
    definition: ToolDefinition | None = None
    flow: FlowLimits = field(default_factory=FlowLimits)
    sandboxed: bool = True
    """Runs in the sandbox: an error it caused names the missing grant."""

    def config_for(self, request: CallRequest) -> dict[str, Any]:
        """The call's config: the definition's, overridden key by key by the call's."""
        config = dict(self.definition.config) if self.definition is not None else {}
        return {**config, **(request.config or {})}

    def call(
        self, request: CallRequest, tool_exec_id: str, environ: Mapping[str, str] | None = None
    ) -> Call:
        """The run of a validated request: config = definition's under the call's; env =
        definition's (templates from ``environ``, the worker's) under the call's.
        :class:`~toolq.errors.InvalidInput` if a template names a variable not set."""
        env: dict[str, str] = {}
        if self.definition is not None:
            env = validate_env(
                self.definition.resolve_env(os.environ if environ is None else environ)
            )
        return Call(
            tool_id=self.tool_id,
            tool_exec_id=tool_exec_id,
            input=request.input,
            env={**env, **request.env},
            config=self.config_for(request),
            time_limits=self.time_limits.for_call(request.timeout_s),
            permissions=self.permissions,
            resources=self.resources,
            mode=self.mode,
        )

    def check_output(self, outcome: Outcome) -> Outcome:
        """A success whose result breaks the definition's output schema is ``invalid_output``;
        a thrown error the sandbox caused names the permission that would grant it."""
        if outcome.error is not None:
            error = outcome.error
            if self.sandboxed and error.kind == "tool_error":
                message = with_grant_hint(error.message, self.permissions)
                if message != error.message:
                    return replace(outcome, error=replace(error, message=message))
            return outcome
        if self.definition is None:
            return outcome
        problem = self.definition.output_problem(outcome.result)
        if problem is None:
            return outcome
        failure = InvalidOutput(
            f"result does not match tool {self.tool_id}'s output schema: {problem}",
            "ValidationError",
        )
        return replace(outcome, result=None, error=ToolErrorInfo.from_failure(failure))


class Profiles:
    """Profiles of every tool a worker meets, resolved on first use (thread-safe enough:
    two threads resolving the same tool compute the same frozen value)."""

    def __init__(
        self, settings: Settings, *, warm_available: bool = True, sandboxed: bool = True
    ) -> None:
        self.settings = settings
        self.warm_available = warm_available
        self.sandboxed = sandboxed
        self._cache: dict[str, ToolProfile] = {}

    def __getitem__(self, tool_id: str) -> ToolProfile:
        profile = self._cache.get(tool_id)
        if profile is None:
            profile = self._cache[tool_id] = self._resolve(tool_id)
        return profile

    def default_resources(self) -> ResourceLimits:
        """The runtime's resource limits (warm processes are started with these)."""
        return resource_limits(self.settings, None)

    def default_permissions(self) -> Permissions:
        return Permissions.parse(self.settings.runtime.permissions)

    def _resolve(self, tool_id: str) -> ToolProfile:
        settings = self.settings
        tool = settings.tool(tool_id)
        own_sandbox = tool.permissions is not None or tool.limits is not None
        mode: Mode = tool.mode or settings.runtime.mode
        if mode == "warm" and (own_sandbox or not self.warm_available):
            mode = "spawn"  # a warm process runs with the runtime's permissions and limits
        if _pick(tool.isolation, settings.runtime.isolation) == "strict":
            mode = "spawn"  # a process of its own per call: no caller meets another's state
        return ToolProfile(
            tool_id=tool_id,
            time_limits=settings.limits_for(tool_id),
            resources=resource_limits(settings, tool_id),
            permissions=Permissions.parse(_pick(tool.permissions, settings.runtime.permissions)),
            retry=retry_policy(settings, tool_id),
            breaker=settings.breaker_settings(tool_id),
            mode=mode,
            definition=settings.definition(tool_id),
            sandboxed=self.sandboxed,
            flow=FlowLimits(
                max_concurrency=tool.max_concurrency,
                key_path=tuple(tool.concurrency_key.split(".")[1:]) if tool.concurrency_key else (),
                rate_interval_s=tool.rate_interval_s,
                reject_over_rate=tool.rate_limit_mode == "reject",
                cache_ttl_s=tool.cache.ttl_s if tool.cache is not None else None,
            ),
        )


T = TypeVar("T")


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value


def resource_limits(settings: Settings, tool_id: str | None) -> ResourceLimits:
    """tool (``tools.<id>.limits``) > runtime; ``tool_id`` None gives the runtime's own."""
    runtime = settings.runtime
    own = settings.tool(tool_id).limits if tool_id is not None else None
    if own is None:
        own = LimitSettings()
    return ResourceLimits(
        max_memory_mb=_pick(own.max_memory_mb, runtime.max_memory_mb),
        max_processes=_pick(own.max_processes, runtime.max_processes),
        max_open_files=_pick(own.max_open_files, runtime.max_open_files),
        max_cpu_time_s=_pick(own.max_cpu_time_s, runtime.max_cpu_time_s),
        max_tmp_mb=_pick(own.max_tmp_mb, runtime.max_tmp_mb),
    )


def retry_policy(settings: Settings, tool_id: str) -> RetryPolicy:
    """tool (``tools.<id>.retry``) > top level (``backoff_*``, ``max_attempts``...)."""
    own = settings.tool(tool_id).retry or RetrySettings()
    return RetryPolicy(
        initial_interval_s=_pick(own.initial_interval_s, settings.backoff_initial_interval_s),
        max_interval_s=_pick(own.max_interval_s, settings.backoff_max_interval_s),
        max_elapsed_s=_pick(own.max_elapsed_time_s, settings.backoff_max_elapsed_time_s),
        multiplier=_pick(own.multiplier, settings.backoff_multiplier),
        max_attempts=_pick(own.max_attempts, settings.max_attempts),
        jitter=_pick(own.jitter, settings.backoff_jitter),
        non_retryable_errors=frozenset(
            _pick(own.non_retryable_errors, settings.non_retryable_errors)
        ),
        retryable_errors=frozenset(_pick(own.retryable_errors, settings.retryable_errors)),
        enabled=_pick(own.enabled, True),
    )
