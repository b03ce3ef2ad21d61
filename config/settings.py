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
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)

from toolq.config.durations import (
    format_duration,
    parse_duration,
    parse_time_limit,
)

Seconds = Annotated[float, BeforeValidator(parse_duration)]
"""A duration field: seconds in code, written in YAML as `30s`, `100ms`, `2m` or a number."""
TimeLimit = Annotated[float, BeforeValidator(parse_time_limit)]
"""A tool time limit: a duration no longer than :data:`MAX_TIME_LIMIT_S`."""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "toolq"
HARD_TIMEOUT_GRACE_S = 5.0
"""Default gap between the soft limit (SIGTERM) and the hard one (SIGKILL of the group)."""
BACKSTOP_MARGIN_S = 10.0
"""Celery's own (soft) time limit sits this far above the hard limit; it should never fire."""
CELERY_HARD_MARGIN_S = 5.0
"""Celery's hard time limit sits this far above its soft backstop."""
VISIBILITY_MARGIN_S = 60.0
"""Redis redelivers an unacknowledged call this long after the backstop limit."""

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_KNOWN_PERMISSIONS = (
    "--allow-read",
    "--allow-write",
    "--allow-net",
    "--allow-env",
    "--allow-sys",
    "--allow-run",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def _check_permissions(flags: list[str] | None) -> list[str] | None:
    for flag in flags or []:
        if flag.split("=", 1)[0] not in _KNOWN_PERMISSIONS:
            raise ValueError(f"unknown permission {flag!r}; known: {', '.join(_KNOWN_PERMISSIONS)}")
    return flags


class RetrySettings(_Strict):
    """A tool's retry policy under `tools.<id>.retry`; unset keys take the top-level backoff_*."""

    initial_interval_s: Seconds | None = Field(None, alias="initial_interval")
    max_interval_s: Seconds | None = Field(None, alias="max_interval")
    max_elapsed_time_s: Seconds | None = Field(None, alias="max_elapsed_time")
    multiplier: float | None = Field(None, ge=1)
    max_attempts: PositiveInt | None = None
    jitter: bool | None = None
    non_retryable_errors: list[str] | None = None
    retryable_errors: list[str] | None = None
    enabled: bool | None = None


class BreakerSettings(_Strict):
    """Circuit breaker: open after `fail_max` consecutive failed calls, or once
    `failure_rate` of the last `window_calls` calls failed (with at least `minimum_calls`
    of them); let one probe through after `reset_timeout`."""

    fail_max: PositiveInt = 5
    failure_rate: float | None = Field(0.5, gt=0, le=1)
    window_calls: PositiveInt = 20
    minimum_calls: PositiveInt = 10
    reset_timeout_s: Seconds = Field(60.0, alias="reset_timeout", gt=0)
    success_threshold: PositiveInt = 1
    enabled: bool = True

    @model_validator(mode="after")
    def _minimum_fits_window(self) -> BreakerSettings:
        if self.minimum_calls > self.window_calls:
            raise ValueError(
                f"minimum_calls ({self.minimum_calls}) must not exceed window_calls "
                f"({self.window_calls})"
            )
        return self


class ToolBreakerSettings(_Strict):
    """A tool's breaker overrides under `tools.<id>.circuit_breaker`."""

    fail_max: PositiveInt | None = None
    failure_rate: float | None = Field(None, gt=0, le=1)
    window_calls: PositiveInt | None = None
    minimum_calls: PositiveInt | None = None
    reset_timeout_s: Seconds | None = Field(None, alias="reset_timeout", gt=0)
    success_threshold: PositiveInt | None = None
    enabled: bool | None = None


class LimitSettings(_Strict):
    """A tool's resource limits under `tools.<id>.limits`; unset keys inherit runtime's."""

    max_memory_mb: PositiveInt | None = None
    max_cpu_time_s: Seconds | None = Field(None, alias="max_cpu_time", gt=0)
    max_open_files: PositiveInt | None = None
    max_processes: PositiveInt | None = None


class ToolSettings(_Strict):
    """Per-tool overrides under `tools: {<tool_id>: {...}}`; unset keys inherit."""

    timeout_s: TimeLimit | None = Field(None, alias="timeout", gt=0)
    hard_timeout_s: TimeLimit | None = Field(None, alias="hard_timeout", gt=0)
    permissions: list[str] | None = None
    mode: Literal["warm", "spawn"] | None = None
    limits: LimitSettings | None = None
    retry: RetrySettings | None = None
    circuit_breaker: ToolBreakerSettings | None = None

    _check_permissions = field_validator("permissions")(_check_permissions)


_NO_TOOL_SETTINGS = ToolSettings()


def _yaml_off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted `off` as false: take it as the word the user wrote."""
    return "off" if value is False else value


class RuntimeSettings(_Strict):
    type: Literal["bun"] = "bun"
    entrypoint: str = "./entrypoint.ts"
    timeout_s: TimeLimit = Field(60.0, alias="timeout", gt=0)
    hard_timeout_s: TimeLimit | None = Field(None, alias="hard_timeout", gt=0)
    permissions: list[str] = Field(default_factory=lambda: ["--allow-read"])
    bun_path: str | None = None
    mode: Literal["warm", "spawn"] = "warm"
    """warm: long-lived Bun processes, entrypoint loaded once; spawn: a fresh Bun per call."""
    max_calls_per_process: PositiveInt = 1000
    max_process_rss_mb: float = Field(256.0, gt=0)
    spawn_ahead: NonNegativeInt = 2
    """spawn: processes started ahead of demand per permission/limit set (0: cold starts)."""
    sandbox: Annotated[Literal["required", "auto", "off"], BeforeValidator(_yaml_off)] = "auto"
    """bubblewrap sandbox: required refuses to start without it; auto warns and runs without."""
    max_memory_mb: PositiveInt = 2048
    max_cpu_time_s: Seconds | None = Field(None, alias="max_cpu_time", gt=0)
    max_open_files: PositiveInt = 1024
    max_processes: PositiveInt = 256

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
    slow_query_threshold_s: Seconds = Field(5.0, alias="slow_query_threshold")


@dataclass(frozen=True)
class TimeLimits:
    """The effective time limits of one call, in seconds: SIGTERM at ``timeout_s``,
    SIGKILL of the process group at ``hard_timeout_s``."""

    timeout_s: float
    hard_timeout_s: float

    @property
    def backstop_s(self) -> float:
        """Celery's own soft limit: above the hard limit, so it never fires first."""
        return self.hard_timeout_s + BACKSTOP_MARGIN_S

    def for_call(self, timeout_s: float | None) -> TimeLimits:
        """A caller's own timeout replaces the soft limit; the tool's grace is kept."""
        if timeout_s is None:
            return self
        grace = self.hard_timeout_s - self.timeout_s
        return TimeLimits(timeout_s, timeout_s + grace)


class Settings(_Strict):
    """Everything toolq reads. Build it with :func:`toolq.config.load_settings`."""

    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    performance: PerformanceSettings = Field(default_factory=PerformanceSettings)
    backoff_initial_interval_s: Seconds = Field(0.1, alias="backoff_initial_interval")
    backoff_max_interval_s: Seconds = Field(5.0, alias="backoff_max_interval")
    backoff_max_elapsed_time_s: Seconds = Field(30.0, alias="backoff_max_elapsed_time")
    backoff_multiplier: float = Field(2.0, ge=1)
    backoff_jitter: bool = True
    max_attempts: PositiveInt = 5
    non_retryable_errors: list[str] = Field(default_factory=list)
    """Names of thrown errors never retried, and neutral for the breaker (the caller's fault)."""
    retryable_errors: list[str] = Field(default_factory=list)
    """Names of thrown errors retried although they do not say ``retryable: true``."""
    circuit_breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    idempotency_ttl_s: Seconds = Field(24 * 3600.0, alias="idempotency_ttl", gt=0)
    dead_letter_max: PositiveInt = 10_000
    visibility_timeout_s: Seconds | None = Field(None, alias="visibility_timeout")
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
        floor = self.max_hard_timeout_s + BACKSTOP_MARGIN_S + CELERY_HARD_MARGIN_S
        if self.visibility_timeout_s is not None and self.visibility_timeout_s < floor:
            raise ValueError(
                f"visibility_timeout ({format_duration(self.visibility_timeout_s)}) must be at "
                f"least the longest hard limit + {BACKSTOP_MARGIN_S + CELERY_HARD_MARGIN_S:g}s "
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

    def tool(self, tool_id: str) -> ToolSettings:
        """A tool's own settings (all unset when it has none)."""
        return self.tools.get(tool_id) or _NO_TOOL_SETTINGS

    def limits_for(self, tool_id: str | None, call_timeout_s: float | None = None) -> TimeLimits:
        """Effective time limits: call > tool > runtime; hard defaults to soft + 5 s.

        ``tool_id`` None gives the runtime's own limits."""
        tool = self.tool(tool_id) if tool_id is not None else _NO_TOOL_SETTINGS
        timeout = self.runtime.timeout_s if tool.timeout_s is None else tool.timeout_s
        hard = self.runtime.hard_timeout_s
        if tool.hard_timeout_s is not None:
            hard = tool.hard_timeout_s
        elif tool.timeout_s is not None:
            hard = None  # a tool that sets its own timeout gets its own grace
        grace = HARD_TIMEOUT_GRACE_S if hard is None else hard - timeout
        return TimeLimits(timeout, timeout + max(grace, 0.0)).for_call(call_timeout_s)

    @property
    def max_hard_timeout_s(self) -> float:
        """The longest hard limit any configured tool can have: no call may outlast it."""
        limits = [self.limits_for(tool_id) for tool_id in self.tools]
        limits.append(self.limits_for(None))
        return max(limit.hard_timeout_s for limit in limits)

    @property
    def redelivery_s(self) -> float:
        """Redis' redelivery delay (visibility timeout): above every limit, and no more."""
        if self.visibility_timeout_s is not None:
            return self.visibility_timeout_s
        return self.max_hard_timeout_s + BACKSTOP_MARGIN_S + VISIBILITY_MARGIN_S

    def breaker_settings(self, tool_id: str) -> BreakerSettings:
        """The effective breaker for one tool: tool > top level > default."""
        own = self.tool(tool_id).circuit_breaker
        if own is None:
            return self.circuit_breaker
        merged = {**self.circuit_breaker.model_dump(), **own.model_dump(exclude_none=True)}
        return BreakerSettings.model_validate(merged)

    @property
    def uses_warm_mode(self) -> bool:
        return self.runtime.mode == "warm" or any(t.mode == "warm" for t in self.tools.values())

    def __repr_args__(self) -> Any:
        # Never print credentials: a Redis URL may carry a password.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" else value


def redact_url(url: Any) -> Any:
    """``redis://:secret@host`` -> ``redis://:***@host``."""
    if not isinstance(url, str):
        return url
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)
