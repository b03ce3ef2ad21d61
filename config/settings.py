"""The typed settings model: one object that producers and workers both read.

YAML keys follow Compozy (`timeout: 30s`); in code the fields carry their unit
(`timeout_s`). Unknown keys are errors here; the loader drops the keys of a Compozy
project file that are not toolq's before they reach this model. Loading and precedence
live in :mod:`toolq.config.loader`, tool definitions in :mod:`toolq.config.tooldefs`.

Over 400 lines on purpose: this is one pydantic model tree (the sections and the
:class:`Settings` that nests and cross-checks them, each field with the attribute
docstring the docs site's configuration reference is generated from), and splitting
it would scatter the one definition of what toolq reads across modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from toolq.config.durations import (
    format_duration,
    parse_duration,
    parse_time_limit,
)
from toolq.keys import Keys
from toolq.permissions import Permissions

if TYPE_CHECKING:
    from toolq.config.tooldefs import ToolDefinition

Seconds = Annotated[float, BeforeValidator(parse_duration)]
"""A duration field: seconds in code, written in YAML as `30s`, `100ms`, `2m` or a number."""
TimeLimit = Annotated[float, BeforeValidator(parse_time_limit)]
"""A tool time limit: a duration no longer than :data:`MAX_TIME_LIMIT_S`."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
_SIZE_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3})


def parse_size(value: object) -> int:
    """Bytes for ``64MiB``, ``500KB``, ``1GiB`` or a bare number of bytes."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a size such as 64MiB, 500KB or a number of bytes")
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"invalid size {value!r}: use e.g. 64MiB, 500KB, 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes, written in YAML as `64MiB`, `500KB` or a number of bytes."""

Isolation = Literal["standard", "strict"]
"""standard: warm calls share a process (module state survives); strict: one process per call."""

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def _check_permissions(flags: list[str] | None) -> list[str] | None:
    """Refuse at load any flag or scoped form the sandbox cannot enforce (names it)."""
    if flags is not None:
        Permissions.parse(flags)
    return flags


class RetrySettings(_Strict):
    """A tool's retry policy under `tools.<id>.retry`; unset keys take the top-level backoff_*."""

    initial_interval_s: Seconds | None = Field(None, alias="initial_interval")
    """Delay before the first retry; unset: `backoff_initial_interval`."""
    max_interval_s: Seconds | None = Field(None, alias="max_interval")
    """Cap on any retry delay; unset: `backoff_max_interval`."""
    max_elapsed_time_s: Seconds | None = Field(None, alias="max_elapsed_time")
    """Deadline from the call's first enqueue; unset: `backoff_max_elapsed_time`."""
    multiplier: float | None = Field(None, ge=1)
    """Each delay is the previous one times this; unset: `backoff_multiplier`."""
    max_attempts: PositiveInt | None = None
    """Attempts per call, the first included; unset: the top-level `max_attempts`."""
    jitter: bool | None = None
    """±50 % jitter on each delay; unset: `backoff_jitter`."""
    non_retryable_errors: list[str] | None = None
    """Thrown error names never retried (replaces the top-level list)."""
    retryable_errors: list[str] | None = None
    """Thrown error names retried (replaces the top-level list)."""
    enabled: bool | None = None
    """false: the tool's calls are never retried."""


class BreakerSettings(_Strict):
    """Circuit breaker: open after `fail_max` consecutive failed calls, or once
    `failure_rate` of the last `window_calls` calls failed (with at least `minimum_calls`
    of them); let one probe through after `reset_timeout`."""

    fail_max: PositiveInt = 5
    """Consecutive failed calls that open the breaker."""
    failure_rate: float | None = Field(0.5, gt=0, le=1)
    """... or this share of the last `window_calls` calls failed (null: off)."""
    window_calls: PositiveInt = 20
    """The calls `failure_rate` is counted over."""
    minimum_calls: PositiveInt = 10
    """The rate counts once the window holds this many calls."""
    reset_timeout_s: Seconds = Field(60.0, alias="reset_timeout", gt=0)
    """Open this long, then exactly one probe call runs across the cluster."""
    success_threshold: PositiveInt = 1
    """Probe successes that close the breaker."""
    enabled: bool = True
    """false: no circuit breaker."""

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
    """The tool's `fail_max`; unset: `circuit_breaker.fail_max`."""
    failure_rate: float | None = Field(None, gt=0, le=1)
    """The tool's `failure_rate`; unset: `circuit_breaker.failure_rate`."""
    window_calls: PositiveInt | None = None
    """The tool's `window_calls`; unset: `circuit_breaker.window_calls`."""
    minimum_calls: PositiveInt | None = None
    """The tool's `minimum_calls`; unset: `circuit_breaker.minimum_calls`."""
    reset_timeout_s: Seconds | None = Field(None, alias="reset_timeout", gt=0)
    """The tool's `reset_timeout`; unset: `circuit_breaker.reset_timeout`."""
    success_threshold: PositiveInt | None = None
    """The tool's `success_threshold`; unset: `circuit_breaker.success_threshold`."""
    enabled: bool | None = None
    """false: no breaker for this tool; unset: `circuit_breaker.enabled`."""


class LimitSettings(_Strict):
    """A tool's resource limits under `tools.<id>.limits`; unset keys inherit runtime's."""

    max_memory_mb: PositiveInt | None = None
    """Memory per Bun process of this tool; unset: `runtime.max_memory_mb`."""
    max_cpu_time_s: Seconds | None = Field(None, alias="max_cpu_time", gt=0)
    """CPU time per call of this tool; unset: `runtime.max_cpu_time`."""
    max_open_files: PositiveInt | None = None
    """`RLIMIT_NOFILE` for this tool; unset: `runtime.max_open_files`."""
    max_processes: PositiveInt | None = None
    """The cgroup's `pids.max` for this tool; unset: `runtime.max_processes`."""
    max_tmp_mb: PositiveInt | None = None
    """Size of this tool's sandboxed /tmp; unset: `runtime.max_tmp_mb`."""


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(value: Any) -> float:
    """``"10/s"``, ``"600/m"``, ``"36/h"`` -> seconds between two calls (GCRA's interval)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f'write a rate as calls per period, e.g. "{value}/s" (got {value!r})')
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f'expected a rate such as "10/s", "600/m" or "36/h" (got {value!r})')
    return _RATE_PERIODS[match.group(2)] / float(match.group(1))


class CacheSettings(_Strict):
    """`tools.<id>.cache`: successful results kept for `ttl`, keyed by tool, input, config."""

    ttl_s: Seconds = Field(alias="ttl", gt=0)
    """How long a successful result answers calls with the same tool, input and config."""


class ToolSettings(_Strict):
    """Per-tool overrides under `tools: {<tool_id>: {...}}`; unset keys inherit."""

    timeout_s: TimeLimit | None = Field(None, alias="timeout", gt=0)
    """The tool's soft limit (SIGTERM); unset: `runtime.timeout`."""
    hard_timeout_s: TimeLimit | None = Field(None, alias="hard_timeout", gt=0)
    """The tool's hard limit (SIGKILL of the group); unset: its own `timeout` + 5 s when
    it sets one, else `runtime.hard_timeout`."""
    permissions: list[str] | None = None
    """The tool's sandbox grants instead of `runtime.permissions`; a tool with its own
    permissions or limits runs in a process of its own (spawn mode)."""
    mode: Literal["warm", "spawn"] | None = None
    """`warm` or `spawn` for this tool; unset: `runtime.mode`."""
    isolation: Isolation | None = None
    """`standard` or `strict` for this tool; unset: `runtime.isolation`."""
    limits: LimitSettings | None = None
    retry: RetrySettings | None = None
    circuit_breaker: ToolBreakerSettings | None = None
    # flow control (docs/flow-control.md)
    max_concurrency: PositiveInt | None = None
    """At most this many calls of the tool run at once, on all workers together."""
    concurrency_key: str | None = None
    """``input.<field>[.<field>...]``: the cap holds per value of that input field."""
    rate_limit: str | None = None
    """``"10/s"``, ``/m`` or ``/h``: calls started, on all workers together (GCRA)."""
    rate_limit_mode: Literal["queue", "reject"] = "queue"
    """Over the rate: `queue` waits for a token; `reject` ends the call as `rate_limited`."""
    cache: CacheSettings | None = None
    lock_definition: bool = False
    """Calls may not override the keys of the tool definition's ``config`` nor the names of
    its ``env`` (a definition that takes a worker secret: a caller could otherwise point its
    ``base_url`` elsewhere and receive the secret)."""

    _check_permissions = field_validator("permissions")(_check_permissions)

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @field_validator("concurrency_key")
    @classmethod
    def _key_path(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"input(\.[A-Za-z0-9_-]+)+", value):
            raise ValueError(f"expected input.<field>[.<field>...] (got {value!r})")
        return value

    @model_validator(mode="after")
    def _key_needs_cap(self) -> ToolSettings:
        if self.concurrency_key is not None and self.max_concurrency is None:
            raise ValueError("concurrency_key needs max_concurrency (the cap per key)")
        return self

    @property
    def rate_interval_s(self) -> float | None:
        """Seconds between two calls under ``rate_limit`` (None: no limit)."""
        return None if self.rate_limit is None else parse_rate(self.rate_limit)


_NO_TOOL_SETTINGS = ToolSettings()


def _yaml_off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted `off` as false: take it as the word the user wrote."""
    return "off" if value is False else value


class RuntimeSettings(_Strict):
    type: Literal["bun"] = "bun"
    """The tool runtime: only `bun` (Compozy's `runtime.type`)."""
    entrypoint: str = "./entrypoint.ts"
    """The module exporting the tools, relative to the project file (and inside its directory)."""
    timeout_s: TimeLimit = Field(60.0, alias="timeout", gt=0)
    """Soft limit of a call: SIGTERM to Bun (Compozy: `runtime.tool_execution_timeout`)."""
    hard_timeout_s: TimeLimit | None = Field(None, alias="hard_timeout", gt=0)
    """Hard limit: SIGKILL to Bun's process group; unset: `timeout` + 5 s."""
    permissions: list[str] = Field(default_factory=lambda: ["--allow-read"])
    """What the sandbox grants tools: Deno's `--allow-*` flags, enforced (docs: Sandbox)."""
    bun_path: str | None = None
    """The Bun to run; unset: `./node_modules/.bin/bun`, the checkout's, then `PATH`."""
    mode: Literal["warm", "spawn"] = "warm"
    """warm: long-lived Bun processes, entrypoint loaded once; spawn: a fresh Bun per call."""
    isolation: Isolation = "standard"
    """strict: a process never serves two calls (runs in spawn mode); see docs/runtime-modes.md."""
    max_calls_per_process: PositiveInt = 1000
    """warm: a Bun process is replaced after this many calls."""
    max_process_rss_mb: float = Field(256.0, gt=0)
    """warm: a Bun process is replaced once its RSS passes this."""
    spawn_ahead: NonNegativeInt = 2
    """spawn: processes started ahead of demand per permission/limit set (0: cold starts)."""
    sandbox: Annotated[Literal["required", "auto", "off"], BeforeValidator(_yaml_off)] = "auto"
    """bubblewrap sandbox: required refuses to start without it; auto warns and runs without."""
    unsafe_share_host_network: bool = False
    """UNSAFE. Unscoped `--allow-net` as the host's own network (as toolq did before): tools
    reach the worker's Redis, loopback services, private networks and cloud metadata.
    Off (default): unscoped `--allow-net` is the public network, through the egress proxy."""
    max_memory_mb: PositiveInt = 2048
    """Memory per Bun process (a cgroup): past it the call ends as `memory_exceeded`."""
    max_cpu_time_s: Seconds | None = Field(None, alias="max_cpu_time", gt=0)
    """CPU time per call, watched every 100 ms (the call ends as `timeout`); unset: none."""
    max_open_files: PositiveInt = 1024
    """`RLIMIT_NOFILE` of each Bun process."""
    max_processes: PositiveInt = 256
    """The cgroup's `pids.max` per Bun process (its threads count)."""
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
    """Tools one worker runs at once (`toolq worker --concurrency` overrides)."""
    enable_metrics: bool = False
    """Serve Prometheus metrics from each worker on `metrics_port`."""
    metrics_port: int = Field(9540, ge=0, le=65535)
    """First port tried for a worker's /metrics; the next free one is taken if it is busy."""
    log_slow_queries: bool = False
    """Log a JSON line for every call slower than `slow_query_threshold`."""
    slow_query_threshold_s: Seconds = Field(5.0, alias="slow_query_threshold")
    """Calls slower than this are logged when `log_slow_queries` is on."""
    task_events: Literal["on_demand", "always"] = "on_demand"
    """Celery's task events (what Flower shows calls from): sent once a monitor asks for
    them (Flower asks every worker every 5 s; ``toolq flower`` at once), or always."""


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


def project_slug(name: str) -> str | None:
    """A project name as a queue name and key namespace: runs of other characters
    become ``-`` (``"Weather Agent"`` -> ``"Weather-Agent"``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or None


class Settings(_Strict):
    """Everything toolq reads. Build it with :func:`toolq.config.load_settings`."""

    name: str | None = None
    """Compozy's project name: the default queue and the namespace of toolq's keys."""
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    performance: PerformanceSettings = Field(default_factory=PerformanceSettings)
    backoff_initial_interval_s: Seconds = Field(0.1, alias="backoff_initial_interval")
    """Retries: the delay before the first retry."""
    backoff_max_interval_s: Seconds = Field(5.0, alias="backoff_max_interval")
    """Retries: the cap on any delay."""
    backoff_max_elapsed_time_s: Seconds = Field(30.0, alias="backoff_max_elapsed_time")
    """Retries: a deadline from the call's first enqueue; no attempt starts after it."""
    backoff_multiplier: float = Field(2.0, ge=1)
    """Retries: each delay is the previous one times this."""
    backoff_jitter: bool = True
    """Retries: ±50 % random jitter on each delay, as Compozy's Go backoff."""
    max_attempts: PositiveInt = 5
    """Attempts per call, the first included (a call may set its own)."""
    non_retryable_errors: list[str] = Field(default_factory=list)
    """Names of thrown errors never retried, and neutral for the breaker (the caller's fault)."""
    retryable_errors: list[str] = Field(default_factory=list)
    """Names of thrown errors retried although they do not say ``retryable: true``."""
    circuit_breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    idempotency_ttl_s: Seconds = Field(24 * 3600.0, alias="idempotency_ttl", gt=0)
    """How long an idempotency key answers with its first call."""
    dead_letter_max: PositiveInt = 10_000
    """Dead-letter entries kept; the oldest are dropped past this."""
    dead_letter_max_bytes: ByteSize = Field(64 * 1024**2, ge=64 * 1024)
    """Byte budget of the dead-letter list; one entry may use a tenth of it."""
    dead_letter_ttl_s: Seconds = Field(7 * 24 * 3600.0, alias="dead_letter_ttl", gt=0)
    """Dead-letter entries are dropped once older than this."""
    redis_socket_timeout_s: Seconds = Field(5.0, alias="redis_socket_timeout", gt=0)
    """Connect and read timeout of every producer, CLI and toolq Redis connection."""
    visibility_timeout_s: Seconds | None = Field(None, alias="visibility_timeout")
    """Redis redelivers a call whose worker was lost this long after it was taken;
    unset: the longest hard limit + 70 s. Values that would let a running call be
    delivered twice are refused."""
    redis_url: str = DEFAULT_REDIS_URL
    """Broker, results and toolq's keys: `redis://`, `rediss://`, `unix://` or `sentinel://`."""
    redis_sentinel_master: str | None = None
    """With sentinel:// URLs: the name of the monitored master."""
    queue: str = DEFAULT_QUEUE
    """The default queue; unset: the project's `name` (as a queue name), else `toolq`."""
    queues: dict[str, list[str]] = Field(default_factory=dict)
    """Routing: queue name -> the tools sent to it (others go to `queue`)."""
    tools: dict[str, ToolSettings] = Field(default_factory=dict)
    secret_key: SecretStr | None = None
    """Fernet key(s) sealing call env (comma-separated, the first seals; see toolq.sealing).
    Only from TOOLQ_SECRET_KEY or a command-line override, never a YAML file."""
    secret_key_file: str | None = None
    """A file holding secret_key (relative paths: the project directory)."""
    remote_control: Literal["inspect", "all"] = "inspect"
    """Celery remote-control commands a worker obeys (anyone who can write to Redis can
    send them): ``inspect``, read-only ones and Flower's event switch; ``all`` also those
    that stop workers or move their queues (shutdown, add_consumer, pool_restart...)."""
    max_queue_length: PositiveInt | None = None
    """Backpressure: enqueue refuses (QueueFull) or blocks when a queue holds this many."""
    max_queue_lengths: dict[str, PositiveInt] = Field(default_factory=dict)
    """Per queue name, overriding `max_queue_length`."""

    _project_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="defaults")
    _definitions: dict[str, ToolDefinition] = PrivateAttr(default_factory=dict)
    _definition_notes: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _queue_from_name(cls, data: Any) -> Any:
        """A named project gets its own default queue (unless one is given)."""
        if isinstance(data, dict) and data.get("queue") is None:
            name = data.get("name")
            slug = project_slug(name) if isinstance(name, str) else None
            data = {**data, "queue": slug or DEFAULT_QUEUE}
        return data

    @property
    def project(self) -> str | None:
        """The project toolq's keys are namespaced by: the name, else an explicit queue
        other than the default; None keeps the un-namespaced ``toolq:`` keys."""
        if self.name is not None and project_slug(self.name):
            return project_slug(self.name)
        return self.queue if self.queue != DEFAULT_QUEUE else None

    @property
    def keys(self) -> Keys:
        """This project's Redis keys (and channels: they name the database)."""
        return Keys(self.project, database=redis_database(self.redis_url))

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

    def queue_cap(self, queue: str) -> int | None:
        """The most calls ``queue`` may hold (None: unbounded)."""
        return self.max_queue_lengths.get(queue, self.max_queue_length)

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

    def with_definitions(
        self, definitions: dict[str, ToolDefinition], notes: tuple[str, ...] = ()
    ) -> Settings:
        self._definitions = dict(definitions)
        self._definition_notes = tuple(notes)
        return self

    @property
    def definition_notes(self) -> tuple[str, ...]:
        """What the loader found but toolq does not run (Deno-era definitions), each a
        sentence naming the tool and what to do; a worker logs them at start-up."""
        return self._definition_notes

    @property
    def definitions(self) -> dict[str, ToolDefinition]:
        """Compozy tool definitions (autoload files and the ``tools:`` list), by id."""
        return self._definitions

    def definition(self, tool_id: str) -> ToolDefinition | None:
        return self._definitions.get(tool_id)

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
        runtime = self.runtime

        def warm(tool: ToolSettings) -> bool:
            isolation = tool.isolation or runtime.isolation
            return (tool.mode or runtime.mode) == "warm" and isolation != "strict"

        return warm(_NO_TOOL_SETTINGS) or any(warm(t) for t in self.tools.values())

    def __repr_args__(self) -> Any:
        # Never print credentials: a Redis URL may carry a password.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" else value


def redact_url(url: Any) -> Any:
    """``redis://:secret@host`` -> ``redis://:***@host``."""
    if not isinstance(url, str):
        return url
    return re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)


def redis_database(url: str) -> int:
    """The database a Redis URL selects: ``?db=N``, else the path of a redis(s):// or
    the last sentinel:// URL (``sentinel://h1:26379;sentinel://h2:26379/3``), else 0."""
    last = urlsplit(url.split(";")[-1])
    if db := parse_qs(last.query).get("db"):
        return int(db[0])
    path = last.path.strip("/")
    return int(path) if last.scheme != "unix" and path.isdigit() else 0
