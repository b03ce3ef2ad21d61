"""The typed settings model: one object that producers and workers both read.

YAML keys follow Compozy (`timeout: 30s`); in code the fields carry their unit
(`timeout_s`). Unknown keys are errors. Loading and precedence live in
:mod:`toolq.config.loader`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)

from toolq.config.durations import format_duration, parse_duration
from toolq.permissions import Permissions

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written in YAML as `30s`, `100ms`, `2m` or a number of seconds."""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "toolq"
HARD_TIMEOUT_GRACE_S = 5.0
"""Default gap between the soft limit (SIGTERM) and the hard one (SIGKILL of the group)."""
BACKSTOP_MARGIN_S = 10.0
"""Celery's own time limit sits this far above the hard limit; it should never fire."""
VISIBILITY_MARGIN_S = 60.0
"""Redis redelivers an unacknowledged call this long after the backstop limit."""

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def _check_permissions(flags: list[str] | None) -> list[str] | None:
    """Refuse at load any flag or scoped form the sandbox cannot enforce (names it)."""
    if flags is not None:
        Permissions.parse(flags)
    return flags


class RetrySettings(_Strict):
    """A tool's retry policy under `tools.<id>.retry`; unset keys take the top-level backoff_*."""

    initial_interval_s: Duration | None = Field(None, alias="initial_interval")
    max_interval_s: Duration | None = Field(None, alias="max_interval")
    max_elapsed_time_s: Duration | None = Field(None, alias="max_elapsed_time")
    multiplier: float | None = Field(None, ge=1)
    max_attempts: PositiveInt | None = None
    jitter: bool | None = None
    non_retryable_errors: list[str] | None = None
    enabled: bool | None = None


class BreakerSettings(_Strict):
    """Circuit breaker: open after `fail_max` consecutive failures, probe after `reset_timeout`."""

    fail_max: PositiveInt = 5
    reset_timeout_s: Duration = Field(60.0, alias="reset_timeout", gt=0)
    success_threshold: PositiveInt = 1
    enabled: bool = True


class ToolBreakerSettings(_Strict):
    """A tool's breaker overrides under `tools.<id>.circuit_breaker`."""

    fail_max: PositiveInt | None = None
    reset_timeout_s: Duration | None = Field(None, alias="reset_timeout", gt=0)
    success_threshold: PositiveInt | None = None
    enabled: bool | None = None


class LimitSettings(_Strict):
    """A tool's resource limits under `tools.<id>.limits`; unset keys inherit runtime's."""

    max_memory_mb: PositiveInt | None = None
    max_cpu_time_s: Duration | None = Field(None, alias="max_cpu_time", gt=0)
    max_open_files: PositiveInt | None = None
    max_processes: PositiveInt | None = None
    max_tmp_mb: PositiveInt | None = None


class ToolSettings(_Strict):
    """Per-tool overrides under `tools: {<tool_id>: {...}}`; unset keys inherit."""

    timeout_s: Duration | None = Field(None, alias="timeout")
    hard_timeout_s: Duration | None = Field(None, alias="hard_timeout")
    permissions: list[str] | None = None
    mode: Literal["warm", "spawn"] | None = None
    limits: LimitSettings | None = None
    retry: RetrySettings | None = None
    circuit_breaker: ToolBreakerSettings | None = None

    _check_permissions = field_validator("permissions")(_check_permissions)


class RuntimeSettings(_Strict):
    type: Literal["bun"] = "bun"
    entrypoint: str = "./entrypoint.ts"
    timeout_s: Duration = Field(60.0, alias="timeout", gt=0)
    hard_timeout_s: Duration | None = Field(None, alias="hard_timeout")
    permissions: list[str] = Field(default_factory=lambda: ["--allow-read"])
    bun_path: str | None = None
    mode: Literal["warm", "spawn"] = "warm"
    """warm: long-lived Bun processes, entrypoint loaded once; spawn: a fresh Bun per call."""
    max_calls_per_process: PositiveInt = 1000
    max_process_rss_mb: float = Field(256.0, gt=0)
    sandbox: Literal["required", "auto", "off"] = "auto"
    """bubblewrap sandbox: required refuses to start without it; auto warns and runs without."""
    max_memory_mb: PositiveInt = 2048
    max_cpu_time_s: Duration | None = Field(None, alias="max_cpu_time", gt=0)
    max_open_files: PositiveInt = 1024
    max_processes: PositiveInt = 256
    max_tmp_mb: PositiveInt = 64
    """Size of a sandboxed call's /tmp (TMPDIR inside it): a tmpfs, gone with the call."""

    _check_permissions = field_validator("permissions")(_check_permissions)

    @model_validator(mode="after")
    def _hard_after_soft(self) -> RuntimeSettings:
        if self.hard_timeout_s is not None and self.hard_timeout_s < self.timeout_s:
            raise ValueError(
                f"hard_timeout ({format_duration(self.hard_timeout_s)}) must not be shorter "
                f"than timeout ({format_duration(self.timeout_s)})"
            )
        return self


class PerformanceSettings(_Strict):
    max_concurrent_tools: PositiveInt = 10
    enable_metrics: bool = False
    metrics_port: int = Field(9540, ge=0, le=65535)
    """First port tried for a worker's /metrics; the next free one is taken if it is busy."""
    log_slow_queries: bool = False
    slow_query_threshold_s: Duration = Field(5.0, alias="slow_query_threshold")


@dataclass(frozen=True)
class ToolLimits:
    """The effective time limits of one call, in seconds."""

    timeout_s: float
    hard_timeout_s: float

    @property
    def backstop_s(self) -> float:
        return self.hard_timeout_s + BACKSTOP_MARGIN_S


class Settings(_Strict):
    """Everything toolq reads. Build it with :func:`toolq.config.load_settings`."""

    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    performance: PerformanceSettings = Field(default_factory=PerformanceSettings)
    backoff_initial_interval_s: Duration = Field(0.1, alias="backoff_initial_interval")
    backoff_max_interval_s: Duration = Field(5.0, alias="backoff_max_interval")
    backoff_max_elapsed_time_s: Duration = Field(30.0, alias="backoff_max_elapsed_time")
    backoff_multiplier: float = Field(2.0, ge=1)
    backoff_jitter: bool = True
    max_attempts: PositiveInt = 5
    non_retryable_errors: list[str] = Field(default_factory=list)
    circuit_breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    idempotency_ttl_s: Duration = Field(24 * 3600.0, alias="idempotency_ttl", gt=0)
    dead_letter_max: PositiveInt = 10_000
    visibility_timeout_s: Duration | None = Field(None, alias="visibility_timeout")
    redis_url: str = DEFAULT_REDIS_URL
    redis_sentinel_master: str | None = None
    """With sentinel:// URLs: the name of the monitored master."""
    queue: str = DEFAULT_QUEUE
    queues: dict[str, list[str]] = Field(default_factory=dict)
    """Routing: queue name -> the tools sent to it (others go to `queue`)."""
    tools: dict[str, ToolSettings] = Field(default_factory=dict)

    _project_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="defaults")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            raise ValueError(f"expected a redis:// URL (got {url!r})")
        return url

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, name: str) -> str:
        if not _QUEUE_NAME.match(name):
            raise ValueError(f"queue names use letters, digits, '_', '.', '-' (got {name!r})")
        return name

    @field_validator("queues")
    @classmethod
    def _routing(cls, queues: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for name, tool_ids in queues.items():
            cls._queue_name(name)
            for tool_id in tool_ids:
                if tool_id in seen:
                    raise ValueError(
                        f"tool {tool_id!r} is routed to both {seen[tool_id]!r} and {name!r}"
                    )
                seen[tool_id] = name
        return queues

    @model_validator(mode="after")
    def _sentinel_has_master(self) -> Settings:
        if self.redis_url.startswith("sentinel://") and not self.redis_sentinel_master:
            raise ValueError("redis_url is a sentinel:// URL: set redis_sentinel_master too")
        return self

    def queue_for(self, tool_id: str) -> str:
        """The queue a tool's calls go to: its entry in `queues`, else `queue`."""
        for name, tool_ids in self.queues.items():
            if tool_id in tool_ids:
                return name
        return self.queue

    @property
    def all_queues(self) -> list[str]:
        """Every queue the configuration names, the default first."""
        return [self.queue, *[name for name in self.queues if name != self.queue]]

    @model_validator(mode="after")
    def _limits_nest(self) -> Settings:
        for tool_id in self.tools:
            limits = self.limits_for(tool_id)
            if limits.hard_timeout_s < limits.timeout_s:
                raise ValueError(
                    f"tools.{tool_id}.hard_timeout must not be shorter than its timeout"
                )
        floor = self.max_hard_timeout_s + BACKSTOP_MARGIN_S + 5
        if self.visibility_timeout_s is not None and self.visibility_timeout_s < floor:
            raise ValueError(
                f"visibility_timeout ({format_duration(self.visibility_timeout_s)}) must be at "
                f"least the longest hard limit + {BACKSTOP_MARGIN_S:g}s + 5s "
                f"({format_duration(floor)}), or calls would run twice"
            )
        return self

    # -- where the settings came from -------------------------------------------------

    @property
    def project_dir(self) -> Path:
        """The directory relative paths (the entrypoint) resolve against."""
        return self._project_dir

    @property
    def source(self) -> str:
        """Where these settings were read from, for messages."""
        return self._source

    def located(self, project_dir: Path, source: str) -> Settings:
        self._project_dir = project_dir
        self._source = source
        return self

    @property
    def entrypoint_path(self) -> Path:
        return (self.project_dir / self.runtime.entrypoint).resolve()

    # -- derived limits ------------------------------------------------------------------

    def limits_for(self, tool_id: str, call_timeout_s: float | None = None) -> ToolLimits:
        """Effective limits: call > tool > runtime; hard defaults to soft + 5 s."""
        tool = self.tools.get(tool_id)
        timeout = self.runtime.timeout_s
        if tool is not None and tool.timeout_s is not None:
            timeout = tool.timeout_s
        hard = self.runtime.hard_timeout_s
        if tool is not None and tool.hard_timeout_s is not None:
            hard = tool.hard_timeout_s
        elif tool is not None and tool.timeout_s is not None:
            hard = None  # a tool that sets its own timeout gets its own grace
        grace = HARD_TIMEOUT_GRACE_S if hard is None else hard - timeout
        if call_timeout_s is not None:
            timeout = call_timeout_s
        return ToolLimits(timeout_s=timeout, hard_timeout_s=timeout + max(grace, 0.0))

    @property
    def max_hard_timeout_s(self) -> float:
        """The longest hard limit any configured tool can have."""
        limits = [self.limits_for(tool_id) for tool_id in self.tools]
        limits.append(self.limits_for(""))
        return max(limit.hard_timeout_s for limit in limits)

    @property
    def redelivery_s(self) -> float:
        """Redis' redelivery delay (visibility timeout): above every limit, and no more."""
        if self.visibility_timeout_s is not None:
            return self.visibility_timeout_s
        return self.max_hard_timeout_s + BACKSTOP_MARGIN_S + VISIBILITY_MARGIN_S

    def retry_settings(self, tool_id: str) -> dict[str, Any]:
        """The effective retry values for one tool: tool > top level > default."""
        values: dict[str, Any] = {
            "initial_interval_s": self.backoff_initial_interval_s,
            "max_interval_s": self.backoff_max_interval_s,
            "max_elapsed_s": self.backoff_max_elapsed_time_s,
            "multiplier": self.backoff_multiplier,
            "max_attempts": self.max_attempts,
            "jitter": self.backoff_jitter,
            "non_retryable_errors": frozenset(self.non_retryable_errors),
            "enabled": True,
        }
        tool = self.tools.get(tool_id)
        if tool is not None and tool.retry is not None:
            own = tool.retry
            for key, value in (
                ("initial_interval_s", own.initial_interval_s),
                ("max_interval_s", own.max_interval_s),
                ("max_elapsed_s", own.max_elapsed_time_s),
                ("multiplier", own.multiplier),
                ("max_attempts", own.max_attempts),
                ("jitter", own.jitter),
                ("enabled", own.enabled),
            ):
                if value is not None:
                    values[key] = value
            if own.non_retryable_errors is not None:
                values["non_retryable_errors"] = frozenset(own.non_retryable_errors)
        return values

    def breaker_settings(self, tool_id: str) -> BreakerSettings:
        """The effective breaker for one tool: tool > top level > default."""
        tool = self.tools.get(tool_id)
        if tool is None or tool.circuit_breaker is None:
            return self.circuit_breaker
        own = tool.circuit_breaker.model_dump(exclude_none=True)
        return self.circuit_breaker.model_copy(update=own)

    def mode_for(self, tool_id: str) -> str:
        tool = self.tools.get(tool_id)
        if tool is not None and tool.mode is not None:
            return tool.mode
        return self.runtime.mode

    @property
    def uses_warm_mode(self) -> bool:
        return self.runtime.mode == "warm" or any(t.mode == "warm" for t in self.tools.values())

    def resource_limits(self, tool_id: str) -> dict[str, Any]:
        """The effective resource limits of one tool: tool > runtime > default."""
        values: dict[str, Any] = {
            "max_memory_mb": self.runtime.max_memory_mb,
            "max_processes": self.runtime.max_processes,
            "max_tmp_mb": self.runtime.max_tmp_mb,
            "max_open_files": self.runtime.max_open_files,
            "max_cpu_time_s": self.runtime.max_cpu_time_s,
        }
        tool = self.tools.get(tool_id)
        if tool is not None and tool.limits is not None:
            values.update(tool.limits.model_dump(exclude_none=True))
        return values

    def has_own_sandbox(self, tool_id: str) -> bool:
        """A tool with its own permissions or limits runs in a process of its own (spawn)."""
        tool = self.tools.get(tool_id)
        return tool is not None and (tool.permissions is not None or tool.limits is not None)

    def permissions_for(self, tool_id: str) -> list[str]:
        tool = self.tools.get(tool_id)
        if tool is not None and tool.permissions is not None:
            return list(tool.permissions)
        return list(self.runtime.permissions)

    def __repr_args__(self) -> Any:
        # Never print credentials: a Redis URL may carry a password.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" else value


def redact_url(url: Any) -> Any:
    """``redis://:secret@host`` -> ``redis://:***@host``."""
    if not isinstance(url, str):
        return url
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)
