"""Turn one delivered call into either a final envelope or a retry: :meth:`CallHandler.handle`
runs the steps of :mod:`toolq.workers.call` in order, and the first step that ends or
defers the call decides.

Every collaborator is passed in — the runtime, breakers, flow control, dead letters,
delivery counter, metrics and clock — so each decision can be tested against fakes in
milliseconds (``tests/fast``), while behaviour tests run the same handler with real Bun,
Redis and Celery. Every outcome, a bad message included, ends as a well-formed envelope,
never an exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from toolq.config.settings import Settings
from toolq.errors import ToolTimeout
from toolq.sealing import Sealer
from toolq.signing import Signer
from toolq.workers.breaker import Admission
from toolq.workers.call.admit import Admit
from toolq.workers.call.attempt import Attempt, Decision, Delivery, Ended, Final, Received, Retry
from toolq.workers.call.cache import ResultReuse
from toolq.workers.call.decide import Decide
from toolq.workers.call.decode import decode, decode_leniently
from toolq.workers.call.finish import Finish
from toolq.workers.call.gate import FlowControl, Slot
from toolq.workers.call.guard import Guard
from toolq.workers.call.ports import (
    BreakerGate,
    CacheStore,
    CancelRegistry,
    DeadLetterSink,
    DeliveryCounter,
    FlowGate,
)
from toolq.workers.call.record import Record
from toolq.workers.call.run import Run
from toolq.workers.metrics import Metrics
from toolq.workers.profile import Profiles
from toolq.workers.runtime.base import Runtime, failed


@dataclass
class CallHandler:
    """A worker's calls, step by step, with the collaborators the steps are given.

    The steps are built once from these fields (``__post_init__``); ``sealer`` alone is
    read per call, so the worker's key lives in one place."""

    settings: Settings
    profiles: Profiles
    runtime: Runtime
    breakers: BreakerGate
    dead_letters: DeadLetterSink
    deliveries: DeliveryCounter
    metrics: Metrics
    sandbox: str = "none"
    """What isolates tools on this worker (``bwrap`` or ``none``), for the metadata."""
    clock: Callable[[], float] = time.time
    sealer: Sealer | None = None
    """With a secret key: env arrives sealed (plain env is refused) and is dead-lettered
    sealed. Read per call by the steps that open or keep an env: the key lives here only."""
    signer: Signer | None = None
    """With a secret key: what this worker re-sends (retries, waits) is signed (toolq.signing)."""
    flow: FlowGate | None = None
    cancels: CancelRegistry | None = None
    cache: CacheStore | None = None

    _guard: Guard = field(init=False, repr=False)
    _reuse: ResultReuse = field(init=False, repr=False)
    _gate: FlowControl = field(init=False, repr=False)
    _admit: Admit = field(init=False, repr=False)
    _run: Run = field(init=False, repr=False)
    _record: Record = field(init=False, repr=False)
    _decide: Decide = field(init=False, repr=False)
    _finish: Finish = field(init=False, repr=False)

    def __post_init__(self) -> None:
        metrics, clock = self.metrics, self.clock
        self._gate = FlowControl(self.flow, metrics, clock)
        self._guard = Guard(self.cancels, self.deliveries, self._gate, clock)
        self._reuse = ResultReuse(self.cache, metrics)
        self._admit = Admit(self.breakers, metrics, clock)
        self._run = Run(self.runtime, self.cancels, metrics)
        self._record = Record(self.breakers, metrics)
        self._decide = Decide(metrics, clock)
        self._finish = Finish(self.settings, metrics, self.dead_letters, self.sandbox, clock)

    def handle(self, message: Any, delivery: Delivery) -> Decision:
        """The steps in order; the first that ends or defers the call decides."""
        received = Received(message, delivery, self.clock())
        decoded = decode(received, self.settings, self.profiles, self.sealer)
        if isinstance(decoded, Ended):  # not a valid call
            return self._finish(received, None, decoded, self.sealer)
        attempt = decoded
        checked = self._guard.check(attempt)  # cancelled? lost with its worker too often?
        if isinstance(checked, Ended):
            return self._settle(attempt, checked)
        attempt = checked
        cache_key = self._reuse.key(attempt)
        hit = self._reuse.lookup(cache_key, attempt)
        if hit is not None:
            return self._settle(attempt, hit)
        slot = self._gate.enter(attempt)  # a rate token, then a cluster slot
        if not isinstance(slot, Slot):
            return self._settle(attempt, slot)
        try:
            if (waited_s := attempt.queue_wait_s) is not None:
                self.metrics.queue_wait_seconds.labels(attempt.tool_id).observe(waited_s)
            admission = self._admit(attempt)  # the tool's circuit breaker
            if not isinstance(admission, Admission):
                return self._settle(attempt, admission)
            outcome = self._run(attempt)
        finally:
            self._gate.leave(attempt, slot)
        counted = self._record(attempt, outcome, admission)
        if outcome.error is None:
            self._reuse.store(cache_key, attempt, outcome)
            return self._settle(attempt, Ended(outcome))
        return self._settle(attempt, self._decide(attempt, outcome, counted))

    def backstop_timeout(self, message: Any, delivery: Delivery) -> Final:
        """Celery's own time limit fired (the runtime's never did): end the call."""
        request = decode_leniently(message, self.sealer)
        received = Received(message, delivery, self.clock())
        stopped = ToolTimeout("Celery's backstop time limit ended the call", "TimeoutError")
        return self._finish(received, request, Ended(failed(stopped)), self.sealer)

    def _settle(self, attempt: Attempt, step: Retry | Ended) -> Decision:
        """A retry goes back to the task as it is; an end becomes the call's envelope."""
        if isinstance(step, Retry):
            return step
        return self._finish(attempt.received, attempt.request, step, self.sealer)
