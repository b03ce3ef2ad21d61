"""The Bun pipe's codec: the request line toolq writes, the envelope the wrapper
answers with, and the :class:`Outcome` a run amounts to.

Request (one JSON object, one line in warm mode)::

    {"tool_id", "tool_exec_id", "input", "config", "env", "timeout_ms", "nonce"}

Envelope (on its own pipe, after the nonce)::

    {"result", "error": {"kind", "name", "message", "stack", "retryable"?} | null,
     "metadata": {"execution_time", "exiting"?, ...}}
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Mapping

from toolq.envelope import ToolErrorInfo, normalize_result
from toolq.errors import InvalidInput, InvalidOutput, MemoryExceeded, ToolCrashed, ToolFailure
from toolq.validation import MAX_JSON_DEPTH, text_nests_deeper
from toolq.workers.runtime.base import Call, Outcome
from toolq.workers.runtime.launch import Launched
from toolq.workers.runtime.pump import Streams

STDERR_IN_ERROR = 4096
"""How much of the stderr tail goes into a crash's error."""


def encode_request(call: Call, nonce: str, extra_env: Mapping[str, str]) -> bytes | ToolFailure:
    """The wrapper's request line (size and JSON were checked by the call contract; a
    tool's config that is not JSON is still caught here)."""
    try:
        return json.dumps(
            {
                "tool_id": call.tool_id,
                "tool_exec_id": call.tool_exec_id,
                "input": call.input,
                "config": dict(call.config),
                "env": {**extra_env, **call.env},
                "timeout_ms": int(call.time_limits.timeout_s * 1000),
                "nonce": nonce,
            },
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
    except (TypeError, ValueError) as exc:
        return InvalidInput(f"request is not JSON: {exc}", "ParseError")


def finish(
    launched: Launched, streams: Streams, failure: ToolFailure | None, call: Call, started: float
) -> Outcome:
    """The outcome of a call; a process the kernel killed for memory is memory_exceeded."""
    if streams.frame is None and launched.memory_exceeded():  # no cgroup read after an answer
        failure = MemoryExceeded(
            f"tool used more than its memory limit of {launched.limits.max_memory_mb} MB "
            "and was killed",
            "MemoryExceeded",
        )
    return interpret(launched.returncode(), streams, failure, call, started)


def interpret(
    returncode: int | None,
    streams: Streams,
    failure: ToolFailure | None,
    call: Call,
    started: float,
) -> Outcome:
    """Turn what was collected into an outcome (``returncode`` None: still running)."""
    total_ms = int((time.monotonic() - started) * 1000)
    stderr = streams.stderr_text(call.env)
    code, sig = _exit_status(returncode)
    common = {
        "total_time_ms": total_ms,
        "exit_code": code,
        "exit_signal": sig,
        "stderr": stderr,
        "output_bytes": len(streams.envelope),
    }
    if (
        failure is None
        and streams.frame is not None
        and text_nests_deeper(streams.frame, MAX_JSON_DEPTH + 1)
    ):
        failure = InvalidOutput(
            f"tool result nests deeper than {MAX_JSON_DEPTH} levels", "ResultTooDeep"
        )
    if failure is None and streams.frame is not None:
        try:
            envelope = json.loads(streams.frame)
            metadata = envelope.get("metadata") or {}
            execution_ms = int(metadata.get("execution_time", total_ms))
            error = envelope.get("error")
            common["exiting"] = bool(metadata.get("exiting"))
        except (ValueError, AttributeError, TypeError, RecursionError) as exc:
            failure = InvalidOutput(f"tool produced an unreadable envelope: {exc}")
        else:
            if error:
                info = ToolErrorInfo.from_dict(error)
                return Outcome(None, info, execution_ms, **common)  # type: ignore[arg-type]
            result = normalize_result(envelope.get("result"))
            return Outcome(result, None, execution_ms, **common)  # type: ignore[arg-type]
    if failure is None:
        if sig is not None:
            failure = ToolCrashed(
                f"Bun was killed by signal {sig} before reporting a result", "Crashed"
            )
        elif code == 0:
            failure = ToolCrashed(
                "Bun exited with code 0 before reporting a result (did the tool call "
                "process.exit?)",
                "Crashed",
            )
        else:
            failure = ToolCrashed(
                f"Bun exited with code {code} before reporting a result", "Crashed"
            )
    tail = stderr[-STDERR_IN_ERROR:] if isinstance(failure, ToolCrashed) else None
    info = ToolErrorInfo.from_failure(failure, stderr=tail or None)
    return Outcome(None, info, total_ms, **common)  # type: ignore[arg-type]


def _exit_status(returncode: int | None) -> tuple[int | None, str | None]:
    if returncode is None or returncode >= 0:
        return returncode, None
    try:
        return None, signal.Signals(-returncode).name
    except ValueError:
        return None, f"signal {-returncode}"
