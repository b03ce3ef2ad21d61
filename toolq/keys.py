"""Every Redis key toolq owns, in one place, under the ``toolq:`` prefix.

Keys are namespaced by project (:class:`Keys`): a project file with a ``name`` (or
an explicit ``queue``) keeps its breakers, dead letters, idempotency keys and
delivery counters under ``toolq:{project}:``, so two projects sharing a Redis never
see each other's state. Without a project the keys are ``toolq:…`` as before.

(Celery and kombu keep their own keys: ``celery-task-meta-<call id>``, the queue
lists and ``_kombu.*``, keyed by unique call ids and by queue names, which are per
project too. kombu's ``unacked`` bookkeeping is moved under the project's prefix by
:mod:`toolq.config.celery_app`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

PREFIX = "toolq:"
CANCELLED_KEEP_S = 24 * 3600.0
"""How long a cancelled call id stays in :attr:`Keys.cancelled`."""


@dataclass(frozen=True)
class Keys:
    """The keys of one project (``namespace`` None: the shared, un-namespaced ones).

    ``database``: the Redis database they live in. Keys are per database, pub/sub
    channels are not (Redis hands a message to every subscriber of the channel, whatever
    database either selected), so a channel names a database other than 0, as kombu's
    broadcast channels do: one project's breakers never hear another database's."""

    namespace: str | None = None
    database: int = 0

    def _channel(self, name: str) -> str:
        return f"{self.prefix}db{self.database}:{name}" if self.database else self.prefix + name

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.namespace}:" if self.namespace else PREFIX

    @property
    def breakers(self) -> str:
        """Set of tool ids that have a breaker."""
        return f"{self.prefix}breakers"

    @property
    def dead_letters(self) -> str:
        """Hash: call id -> JSON entry (input, env, error, history)."""
        return f"{self.prefix}dlq:entries"

    @property
    def dead_letter_index(self) -> str:
        """Sorted set: call id scored by the time it failed."""
        return f"{self.prefix}dlq:index"

    @property
    def dead_letter_sizes(self) -> str:
        """Hash: call id -> bytes of its entry (for the byte budget)."""
        return f"{self.prefix}dlq:sizes"

    @property
    def dead_letter_bytes(self) -> str:
        """Counter: bytes of all entries together."""
        return f"{self.prefix}dlq:bytes"

    @property
    def breaker_events(self) -> str:
        """Pub/sub channel: ``tool state failures window_failures`` after every recorded
        verdict or reset, so workers keep their view of healthy breakers current."""
        return self._channel("breaker-events")

    def breaker(self, tool_id: str) -> str:
        """Hash: state, failures, successes, opened_at, probe, probe_until, trips."""
        return f"{self.prefix}breaker:{tool_id}"

    def idempotency(self, key: str) -> str:
        """String: the call first enqueued under this idempotency key, as JSON ``{"id",
        "tool_id", "hash"}`` (:mod:`toolq.producers.idempotency`; expires)."""
        return f"{self.prefix}idem:{key}"

    def chunk_handed_off(self, chunk_id: str) -> str:
        """Set: a chunk's calls handed to other messages (retries, the rest of the chunk)."""
        return f"{self.prefix}chunk:{chunk_id}"

    def deliveries(self, call_id: str, attempt: int) -> str:
        """Counter: how often one attempt of a call was delivered to a worker (expires)."""
        return f"{self.prefix}deliveries:{call_id}:{attempt}"

    # -- flow control (toolq.workers.flow, toolq.workers.cancel, toolq.workers.cache) --

    def slots(self, tool_id: str, key: str | None = None) -> str:
        """Sorted set: call id holding a slot -> its lease's expiry (Redis time)."""
        return f"{self.prefix}slots:{tool_id}{_keyed(key)}"

    def slot_waiting(self, tool_id: str, key: str | None = None) -> str:
        """Sorted set: call id waiting for a slot -> its first arrival (enqueued_at)."""
        return f"{self.prefix}slot-waiting:{tool_id}{_keyed(key)}"

    def slot_waiting_seen(self, tool_id: str, key: str | None = None) -> str:
        """Sorted set: waiting call id -> when it counts as gone unless it asks again."""
        return f"{self.prefix}slot-seen:{tool_id}{_keyed(key)}"

    def rate(self, tool_id: str) -> str:
        """String: the tool's GCRA theoretical arrival time (Redis time, seconds)."""
        return f"{self.prefix}rate:{tool_id}"

    def rate_waiting(self, tool_id: str) -> str:
        """Sorted set: call id holding a future rate token -> the token's time."""
        return f"{self.prefix}rate-waiting:{tool_id}"

    def rate_priority(self, tool_id: str) -> str:
        """Hash: call id holding a future rate token -> its priority (0 .. 9)."""
        return f"{self.prefix}rate-priority:{tool_id}"

    @property
    def cancelled(self) -> str:
        """Sorted set: cancelled call id -> when it was cancelled (trimmed after a day)."""
        return f"{self.prefix}cancelled"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel: a cancelled call id, for the worker that may be running it."""
        return self._channel("cancel")

    def cache(self, digest: str) -> str:
        """String: a cached successful result (JSON), expiring after the tool's cache ttl."""
        return f"{self.prefix}cache:{digest}"

    @property
    def worker_info(self) -> str:
        """Hash: worker node name -> what it tells ``toolq status`` about itself (JSON:
        whether its tools run sandboxed); :mod:`toolq.workers.info`."""
        return f"{self.prefix}worker-info"


def queue_workers(queue: str) -> str:
    """Sorted set: hostname of a worker consuming ``queue`` -> its last heartbeat (Redis
    time); :mod:`toolq.presence`. Keyed by queue name alone: queue names are per project
    already, and a worker of any project may consume any queue."""
    return f"{PREFIX}queue-workers:{queue}"


def _keyed(key: str | None) -> str:
    """A concurrency key's value as a key suffix (quoted: a value may hold ``:``)."""
    return "" if key is None else ":" + quote(key, safe="")


DEFAULT = Keys()
"""The keys of a project without a name (and the module-level names below)."""

BREAKERS = DEFAULT.breakers
DEAD_LETTERS = DEFAULT.dead_letters
DEAD_LETTER_INDEX = DEFAULT.dead_letter_index
DEAD_LETTER_SIZES = DEFAULT.dead_letter_sizes
DEAD_LETTER_BYTES = DEFAULT.dead_letter_bytes
breaker = DEFAULT.breaker
idempotency = DEFAULT.idempotency
deliveries = DEFAULT.deliveries
