"""Producers: the public API that application code uses to enqueue tool calls."""

from toolq.producers.aio import AsyncToolClient
from toolq.producers.call import AsyncToolCall, ToolCall
from toolq.producers.client import ToolClient

__all__ = ["AsyncToolCall", "AsyncToolClient", "ToolCall", "ToolClient"]
