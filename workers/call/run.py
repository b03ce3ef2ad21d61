"""Step 6, run: the runtime runs the tool — with the call's cancel token, in its
tracing span, counted as running — and the outcome leaves redacted.

Env values (the call's and its definition's) never leave in an error, a stack or
stderr: what follows stores, logs and retries only the redacted outcome.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

from toolq import tracing
from toolq.errors import InvalidInput
from toolq.workers.call.attempt import Attempt
from toolq.workers.call.ports import CancelRegistry
from toolq.workers.metrics import Metrics
from toolq.workers.runtime.base import Outcome, Runtime, failed
from toolq.workers.runtime.secrets import redact_outcome


@dataclass
class Run:
    """Runs one admitted attempt on the worker's runtime."""

    runtime: Runtime
    cancels: CancelRegistry | None
    metrics: Metrics

    def __call__(self, attempt: Attempt) -> Outcome:
        request, profile = attempt.request, attempt.profile
        try:
            call = profile.call(request, attempt.call_id)  # config and env of its definition
        except InvalidInput as refused:
            return failed(refused)
        running = (
            self.cancels.running(attempt.call_id) if self.cancels is not None else nullcontext(None)
        )
        with running as token, self.metrics.running():
            if token is not None:
                call = replace(call, cancel=token)
            with tracing.run_span(request.tool_id, call.mode) as span:
                outcome = redact_outcome(profile.check_output(self.runtime.run(call)), call.env)
                tracing.record_output(span, outcome.stderr)  # redacted above
                tracing.record_spawn(span, outcome.launched_ns)
        self.metrics.observe_run(request.tool_id, outcome)
        return outcome
