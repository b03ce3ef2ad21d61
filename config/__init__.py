"""Configuration read by producers and workers alike: settings, profiles, the Celery app.

The settings model and its loader (pydantic, YAML, JSON Schema) load on first use (PEP
562), so a module that needs only :mod:`toolq.config.durations` (``toolq health``, the
container probe) does not pay for them.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from toolq.config.loader import PROFILES, load_settings
    from toolq.config.settings import Settings, TimeLimits, ToolSettings

_LAZY = {
    "PROFILES": "toolq.config.loader",
    "Settings": "toolq.config.settings",
    "TimeLimits": "toolq.config.settings",
    "ToolSettings": "toolq.config.settings",
    "load_settings": "toolq.config.loader",
}

__all__ = ["PROFILES", "Settings", "TimeLimits", "ToolSettings", "load_settings"]


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
