"""Configuration read by producers and workers alike: settings, profiles, the Celery app."""

from toolq.config.loader import PROFILES, load_settings
from toolq.config.settings import Settings, TimeLimits, ToolSettings

__all__ = ["PROFILES", "Settings", "TimeLimits", "ToolSettings", "load_settings"]
