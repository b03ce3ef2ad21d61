"""Per-tool circuit breakers, shared by every worker on every host through Redis.

Built on pybreaker's model (its states and settings), with one fix: pybreaker's own
Redis storage reads, decides and writes in separate steps, so under concurrency every
process that sees an expired open breaker goes half-open and sends its call through,
and counters race. Here each transition is one Lua script on a single hash:

- ``admit``: closed lets calls through; open refuses them until ``reset_timeout``
  has passed, then turns half-open; half-open hands out exactly one probe lease
  across the cluster (it expires, so a prober that dies does not wedge the breaker);
- ``record``: in closed state a failed call opens the breaker at ``fail_max``
  consecutive failures, or when ``failure_rate`` of the last ``window_calls`` calls
  failed (once ``minimum_calls`` were seen); the probe's failure re-opens it;
  ``success_threshold`` probe successes close it.

What counts is the call's business (one verdict per call, :func:`verdict_of`, reported by
:mod:`toolq.workers.call.record`).

Redis' own clock (``TIME``) is used, so hosts with skewed clocks agree. A worker skips
Redis for the tools it knows to be healthy (:mod:`toolq.workers.breaker_events`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pybreaker
import redis

from toolq import keys
from toolq.config.settings import BreakerSettings
from toolq.envelope import ToolErrorInfo
from toolq.workers.breaker_events import Health

COUNTED_KINDS = frozenset({"timeout", "crashed", "tool_error"})
"""Failures that may say the tool is unwell; toolq's refusals (invalid_input...) do not."""

Verdict = Literal["success", "failure", "neutral"]
"""How one call counts for its tool's health."""
HALF_OPEN_RECHECK_S = 0.5
"""While another call probes, a waiting call checks back this often (a probe is usually quick;
its lease, which can be long, only bounds a prober that died)."""

# Admit never creates a key: a tool id that no call ever ran leaves nothing behind.
_ADMIT = """
local h = KEYS[1]
local state = redis.call('HGET', h, 'state')
if not state or state == 'closed' then
  local _, failed = string.gsub(redis.call('HGET', h, 'window') or '', '1', '')
  return {'closed', '0', '', redis.call('HGET', h, 'failures') or '0', tostring(failed)}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if state == 'open' then
  local reopen = tonumber(redis.call('HGET', h, 'opened_at') or '0') + tonumber(ARGV[1])
  if now < reopen then return {'open', tostring(reopen - now), ''} end
  redis.call('HSET', h, 'state', 'half-open', 'successes', 0)
end
local busy_until = tonumber(redis.call('HGET', h, 'probe_until') or '0')
if redis.call('HEXISTS', h, 'probe') == 1 and now < busy_until then
  return {'half-open', tostring(busy_until - now), ''}
end
redis.call('HSET', h, 'probe', ARGV[2], 'probe_until', tostring(now + tonumber(ARGV[3])))
return {'probe', '0', ARGV[2]}
"""

# A closed breaker keeps the last `window_calls` verdicts as a string of 0/1 (1: failed)
# beside the count of consecutive failures; either threshold opens it.
_RECORD = """
local h = KEYS[1]
local outcome, token = ARGV[1], ARGV[2]
local fail_max, successes_needed = tonumber(ARGV[3]), tonumber(ARGV[4])
local rate, window, minimum = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local skipped = tonumber(ARGV[9])
local state = redis.call('HGET', h, 'state') or 'closed'
local probe = token ~= '' and redis.call('HGET', h, 'probe') == token
if probe then redis.call('HDEL', h, 'probe', 'probe_until') end
if outcome == 'neutral' then return state end
redis.call('SADD', KEYS[2], ARGV[8])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function tell(new_state)
  local calls = redis.call('HGET', h, 'window') or ''
  local _, failed = string.gsub(calls, '1', '')
  local failures = redis.call('HGET', h, 'failures') or '0'
  redis.call('PUBLISH', KEYS[3], ARGV[8] .. ' ' .. new_state .. ' ' .. failures .. ' ' .. failed)
  return new_state
end
local function trip()
  redis.call('HSET', h, 'state', 'open', 'opened_at', tostring(now), 'successes', 0,
             'window', '')
  redis.call('HINCRBY', h, 'trips', 1)
  return tell('open')
end
if state == 'closed' then
  -- successes a worker counted locally while the breaker was clean come first
  local calls = (redis.call('HGET', h, 'window') or '')
    .. string.rep('0', math.min(skipped, window)) .. (outcome == 'failure' and '1' or '0')
  if #calls > window then calls = string.sub(calls, -window) end
  redis.call('HSET', h, 'window', calls)
  if outcome == 'success' then
    redis.call('HSET', h, 'failures', 0)
    return tell('closed')
  end
  local failures = redis.call('HINCRBY', h, 'failures', 1)
  local _, failed = string.gsub(calls, '1', '')
  if failures >= fail_max or (rate > 0 and #calls >= minimum and failed / #calls >= rate) then
    return trip()
  end
  return tell('closed')
end
if state == 'half-open' and probe then
  if outcome == 'failure' then return trip() end
  if redis.call('HINCRBY', h, 'successes', 1) >= successes_needed then
    redis.call('HSET', h, 'state', 'closed', 'failures', 0, 'successes', 0, 'window', '')
    redis.call('HDEL', h, 'opened_at')
    return tell('closed')
  end
end
return state
"""


@dataclass(frozen=True)
class Admission:
    """Whether a call may run now; ``probe`` is the half-open lease it must report back."""

    allowed: bool
    state: str
    retry_in_s: float = 0.0
    probe: str = ""


@dataclass(frozen=True)
class BreakerStatus:
    tool_id: str
    state: str
    failures: int
    opened_at: float | None
    reopens_in_s: float | None
    trips: int
    window_calls: int = 0
    """Calls in the failure-rate window (closed state)."""
    window_failures: int = 0


class ToolBreaker(pybreaker.CircuitBreaker):
    """One tool's breaker: pybreaker's settings (``fail_max``, ``reset_timeout``,
    ``success_threshold``), its state in Redis. ``admit`` before a call, ``record`` after."""

    def __init__(
        self,
        client: redis.Redis,
        tool_id: str,
        config: BreakerSettings,
        namespace: keys.Keys = keys.DEFAULT,
    ) -> None:
        super().__init__(
            fail_max=config.fail_max,
            reset_timeout=config.reset_timeout_s,
            success_threshold=config.success_threshold,
            name=tool_id,
        )
        self.tool_id = tool_id
        self.config = config
        self._keys = namespace
        self._admit = client.register_script(_ADMIT)
        self._record = client.register_script(_RECORD)

    def admit(self, probe_lease_s: float) -> tuple[Admission, bool]:
        """The admission, and whether the breaker is closed and clean."""
        token = uuid.uuid4().hex
        reply = self._admit(
            keys=[self._keys.breaker(self.tool_id)],
            args=[self.reset_timeout, token, probe_lease_s],
        )
        state, wait, probe = (part.decode() for part in reply[:3])
        if state == "closed":
            clean = [part.decode() for part in reply[3:5]] == ["0", "0"]
            return Admission(True, state), clean
        if state == "probe":
            return Admission(True, "half-open", 0.0, probe), False
        if state == "half-open":
            return Admission(False, state, min(float(wait), HALF_OPEN_RECHECK_S)), False
        return Admission(False, state, float(wait)), False

    def record(self, verdict: Verdict, probe: str = "", skipped: int = 0) -> str:
        """Report a call's verdict (after ``skipped`` successes counted locally); returns
        the breaker's state afterwards."""
        rate = self.config.failure_rate or 0
        state: bytes = self._record(
            keys=[self._keys.breaker(self.tool_id), self._keys.breakers, self._keys.breaker_events],
            args=[
                verdict,
                probe,
                self.fail_max,
                self.success_threshold,
                rate,
                self.config.window_calls,
                self.config.minimum_calls,
                self.tool_id,
                skipped,
            ],
        )
        return state.decode()


class Breakers:
    """All tools' breakers, for a worker (admit/record) and for operators (list/reset)."""

    def __init__(
        self,
        client: redis.Redis,
        config_for: Callable[[str], BreakerSettings],
        namespace: keys.Keys = keys.DEFAULT,
    ) -> None:
        self._redis = client
        self._keys = namespace
        self._config_for = config_for
        self._breakers: dict[str, ToolBreaker] = {}
        self.health = Health(client, namespace.breaker_events)

    def get(self, tool_id: str) -> ToolBreaker:
        breaker = self._breakers.get(tool_id)
        if breaker is None:
            breaker = ToolBreaker(self._redis, tool_id, self._config_for(tool_id), self._keys)
            self._breakers[tool_id] = breaker
        return breaker

    def admit(self, tool_id: str, probe_lease_s: float) -> Admission:
        """A tool whose breaker this worker knows to be clean is admitted without Redis."""
        if self.health.clean(tool_id):
            return Admission(True, "closed")
        version = self.health.version(tool_id)
        admission, clean = self.get(tool_id).admit(probe_lease_s)
        self.health.learned(tool_id, clean, version)
        return admission

    def record(self, tool_id: str, verdict: Verdict, probe: str = "") -> str:
        """A success on a clean breaker changes nothing there: it is counted here."""
        if verdict == "success" and not probe and self.health.clean(tool_id):
            self.health.skip(tool_id)
            return "closed"
        skipped = self.health.take_skipped(tool_id) if verdict != "neutral" else 0
        return self.get(tool_id).record(verdict, probe, skipped)

    def statuses(self) -> list[BreakerStatus]:
        seconds, micros = self._redis.time()
        now = seconds + micros / 1e6
        statuses = []
        for raw in sorted(self._redis.smembers(self._keys.breakers)):
            tool_id = _text(raw)
            data = {
                _text(k): _text(v)
                for k, v in self._redis.hgetall(self._keys.breaker(tool_id)).items()
            }
            state = data.get("state", "closed")
            opened_at = float(data["opened_at"]) if "opened_at" in data else None
            reopens_in = None
            if state == "open" and opened_at is not None:
                reset = self._config_for(tool_id).reset_timeout_s
                reopens_in = max(0.0, opened_at + reset - now)
            statuses.append(
                BreakerStatus(
                    tool_id,
                    state,
                    int(data.get("failures", 0)),
                    opened_at,
                    reopens_in,
                    int(data.get("trips", 0)),
                    len(data.get("window", "")),
                    data.get("window", "").count("1"),
                )
            )
        return statuses

    def reset(self, tool_id: str) -> bool:
        """Close one breaker by hand; False if it never existed."""
        existed = bool(self._redis.exists(self._keys.breaker(tool_id)))
        if existed:
            self._redis.hset(
                self._keys.breaker(tool_id),
                mapping={"state": "closed", "failures": 0, "successes": 0, "window": ""},
            )
            self._redis.hdel(self._keys.breaker(tool_id), "opened_at", "probe", "probe_until")
            self._redis.publish(self._keys.breaker_events, f"{tool_id} closed 0 0")
        return existed


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def verdict_of(
    error: ToolErrorInfo | None,
    *,
    non_retryable_errors: frozenset[str] = frozenset(),
    shortened: bool = False,
) -> Verdict:
    """How one call's outcome counts for its tool's health.

    Neutral: what toolq refused or could not find, errors the tool marks as the
    caller's fault (``retryable: false``, or a name in ``non_retryable_errors``), and a
    timeout under a limit the caller shortened (the tool never had its own)."""
    if error is None:
        return "success"
    if error.kind not in COUNTED_KINDS:
        return "neutral"
    if error.kind == "tool_error" and (
        error.retryable_hint is False or error.name in non_retryable_errors
    ):
        return "neutral"
    if error.kind == "timeout" and shortened:
        return "neutral"
    return "failure"
