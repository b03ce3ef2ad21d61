"""toolq: run Compozy-style Bun tools at scale from Python, through Redis and Celery.

The public door: everything application code needs is importable from here.
"""

from toolq.config import Settings, load_settings
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
from toolq.producers import AsyncToolCall, AsyncToolClient, ToolCall, ToolClient

__version__ = "0.1.0"

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
