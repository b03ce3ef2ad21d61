"""Producers: the public API that application code uses to enqueue tool calls."""

from toolq.producers.client import ToolCall, ToolClient

__all__ = ["ToolCall", "ToolClient"]
