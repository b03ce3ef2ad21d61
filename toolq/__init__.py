"""toolq: run Compozy-style Bun tools at scale from Python, through Redis and Celery.

The public door: everything application code needs is importable from here.

The errors and the result envelope load with the package; the clients (Celery, kombu,
redis) and the settings (pydantic, YAML) on first use (PEP 562), so ``import
toolq.errors``, a worker's ground modules or a probe like ``toolq health`` do not pay for
them.
"""

import importlib as _importlib
import typing as _typing

from toolq.envelope import ToolErrorInfo, ToolResult
from toolq.errors import (
    BrokerUnavailable,
    Cancelled,
    CircuitOpen,
    ConfigError,
    InvalidInput,
    InvalidOutput,
    MemoryExceeded,
    OutputTooLarge,
    QueueFull,
    RateLimited,
    ResultTimeout,
    ToolCrashed,
    ToolError,
    ToolFailure,
    ToolNotFound,
    ToolqError,
    ToolTimeout,
)

if _typing.TYPE_CHECKING:
    from toolq.config import Settings, load_settings
    from toolq.producers import AsyncToolCall, AsyncToolClient, ToolCall, ToolClient

__version__ = "0.1.0"

_LAZY = {
    "AsyncToolCall": "toolq.producers",
    "AsyncToolClient": "toolq.producers",
    "Settings": "toolq.config",
    "ToolCall": "toolq.producers",
    "ToolClient": "toolq.producers",
    "load_settings": "toolq.config",
}
"""Public names imported on first use, and the module each comes from."""

__all__ = [
    "AsyncToolCall",
    "AsyncToolClient",
    "BrokerUnavailable",
    "Cancelled",
    "CircuitOpen",
    "ConfigError",
    "InvalidInput",
    "InvalidOutput",
    "MemoryExceeded",
    "OutputTooLarge",
    "QueueFull",
    "RateLimited",
    "ResultTimeout",
    "Settings",
    "ToolCall",
    "ToolClient",
    "ToolCrashed",
    "ToolError",
    "ToolErrorInfo",
    "ToolFailure",
    "ToolNotFound",
    "ToolResult",
    "ToolTimeout",
    "ToolqError",
    "__version__",
    "load_settings",
]


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
