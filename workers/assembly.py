"""Build a worker from settings, in one place: find Bun, check the entrypoint (load it
once in Bun), probe the sandbox and cgroups, start the runtimes, open Redis, build the
metrics.

:class:`toolq.workers.call.handler.CallHandler` only handles calls; everything that
touches the machine at start-up happens here, once per worker process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import redis

from toolq.config.connections import close_redis, redis_client, redis_endpoints
from toolq.config.settings import Settings
from toolq.errors import ConfigError
from toolq.sealing import load_sealer
from toolq.signing import load_signer
from toolq.workers.breaker import Breakers
from toolq.workers.cache import ResultCache
from toolq.workers.call.guard import MAX_DELIVERIES
from toolq.workers.call.handler import CallHandler
from toolq.workers.cancel import CancelWatch
from toolq.workers.deadletter import DeadLetters
from toolq.workers.flow import Flow
from toolq.workers.info import sandbox_info
from toolq.workers.metrics import Metrics
from toolq.workers.profile import Profiles
from toolq.workers.redelivery import Deliveries
from toolq.workers.runtime.base import Mode, Runtime
from toolq.workers.runtime.bun import WRAPPER, find_bun
from toolq.workers.runtime.egress import Destinations
from toolq.workers.runtime.launch import Launcher
from toolq.workers.runtime.limits import Cgroups
from toolq.workers.runtime.routing import ByMode
from toolq.workers.runtime.sandbox import Sandbox, make_sandbox
from toolq.workers.runtime.spawn import Key, SpawnRuntime
from toolq.workers.runtime.warm import WarmRuntime
from toolq.workers.startup import check_entrypoint, report_definitions

log = logging.getLogger("toolq.worker")


@dataclass
class WorkerParts:
    """A worker's call handler and what must be closed when it stops."""

    handler: CallHandler
    runtime: ByMode
    warm: WarmRuntime | None
    spawn: SpawnRuntime
    spawn_keys: list[Key]
    """The permission/limit sets of tools configured to spawn: started ahead at start-up."""
    redis: redis.Redis
    max_concurrent: int
    cancels: CancelWatch | None = None

    def start(self) -> None:
        """Start Bun processes ahead of the first calls (threads pool: in this process)."""
        if self.warm is not None:
            self.warm.start()
        self.spawn.start(self.spawn_keys)

    @property
    def sandbox_info(self) -> dict[str, object]:
        """Whether its tools run sandboxed, for ``toolq status`` (:mod:`toolq.workers.info`)."""
        return sandbox_info(self.handler.sandbox, self.handler.settings.runtime.sandbox)

    def close(self) -> None:
        """Stop the Bun processes (warm and started ahead), the cancel watch and the Redis
        connection."""
        self.runtime.close()
        if self.cancels is not None:
            self.cancels.close()
        close_redis(self.redis)


def build_launcher(settings: Settings) -> Launcher:
    """Bun, the entrypoint, the sandbox and cgroups, checked once; ConfigError if unusable."""
    entrypoint = settings.entrypoint_path
    if not entrypoint.is_file():
        raise ConfigError(
            f"{settings.source}: runtime.entrypoint: {entrypoint} does not exist",
            key="runtime.entrypoint",
            source=settings.source,
        )
    bun = find_bun(settings.runtime.bun_path, settings.project_dir)
    launcher = Launcher(
        bun,
        entrypoint,
        settings.project_dir,
        sandbox=make_sandbox(
            settings.runtime.sandbox,
            bun,
            WRAPPER,
            settings.project_dir,
            entrypoint,
            unsafe_share_host_network=settings.runtime.unsafe_share_host_network,
        ),
        cgroups=Cgroups.detect(),
        destinations=Destinations(redis_endpoints(settings)),
    )
    if launcher.sandbox is not None and settings.secret_key_file is not None:
        key_file = settings.project_dir / Path(settings.secret_key_file).expanduser()
        launcher.sandbox.hide_files = (str(key_file),)  # the project dir is in every view
    if launcher.sandbox is not None and launcher.sandbox.run_as is None:
        log.warning(
            "this worker is not root: tools run as this worker's uid %d on the host (65534 "
            "only inside their user namespace); under --allow-read they see the host without "
            "%s and the secret key file, but anything else this user owns stays readable: run "
            "workers as root or as a user that owns nothing else",
            os.geteuid(),
            ", ".join(launcher.sandbox.hidden_dirs),
        )
    _warn_if_project_holds_redis_password(settings)
    if launcher.sandbox is not None and launcher.sandbox.netshim is None:
        log.warning(
            "workers/runtime/netshim.so is not built (make setup compiles it): tools granted "
            "--allow-net reach the network through fetch only, raw TCP sockets have no route"
        )
    if settings.runtime.unsafe_share_host_network:
        log.warning(
            "runtime.unsafe_share_host_network: tools granted --allow-net reach the host's "
            "network, this worker's Redis and cloud metadata included"
        )
    if launcher.cgroups is None:
        log.warning(
            "no cgroup can be made here: memory is watched by RSS, processes are not limited"
        )
    return launcher


def _warn_if_project_holds_redis_password(settings: Settings) -> None:
    """Tools may read the project directory (every profile grants it): a Redis password
    written in its configuration file is every tool's (docs/operations.md, "Redis credentials")."""
    password = urlsplit(settings.redis_url.split(";")[0]).password
    source = Path(settings.source)
    if not password or not source.is_file() or not source.is_relative_to(settings.project_dir):
        return
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if password in source.read_text():
            log.warning(
                "%s holds the Redis password, and tools may read the project directory: "
                "set it in TOOLQ_REDIS_URL (or a secret that sets it) instead",
                source,
            )


def build_worker(
    settings: Settings,
    *,
    max_concurrent: int | None = None,
    warm_processes: int | None = None,
    spawn_ahead: int | None = None,
    metrics: Metrics | None = None,
) -> WorkerParts:
    """Everything one worker process needs to run calls.

    ``warm_processes``: how many warm Bun processes to keep (default: one per slot;
    prefork pool processes keep one each, started lazily after the fork).
    ``spawn_ahead``: spawn-mode processes started ahead per key (default
    ``runtime.spawn_ahead``; a prefork pool process, one call at a time, needs one).
    """
    slots = max_concurrent or settings.performance.max_concurrent_tools
    sealer = load_sealer(settings)  # a bad key stops the worker before anything starts
    signer = load_signer(settings)
    if signer is None:
        log.warning(
            "NO SECRET KEY: calls are not authenticated. Anyone who can write to this Redis "
            "(a tool granted network access, another project) can make this worker run its "
            "tools with its grants. Set TOOLQ_SECRET_KEY or secret_key_file (`toolq keygen`) "
            "on workers and producers (docs/security/signing.md)"
        )
    # Read once: no child (a tool granted --allow-env, a pool process) inherits the key.
    if os.environ.pop("TOOLQ_SECRET_KEY", None) is not None:
        log.warning(
            "TOOLQ_SECRET_KEY stays readable in /proc/%d/environ (to this worker's user and "
            "root) for the worker's whole life, though dropped from its environment: prefer "
            "secret_key_file on workers (docs/security/secrets.md)",
            os.getpid(),
        )
    launcher = build_launcher(settings)
    profiles = Profiles(
        settings, warm_available=settings.uses_warm_mode, sandboxed=launcher.sandbox is not None
    )
    if launcher.sandbox is not None:
        _check_grants(launcher.sandbox, settings, profiles)
    # Load the entrypoint once, as tools will run, before saying ready (either mode).
    exported = check_entrypoint(
        settings, launcher, profiles.default_permissions(), profiles.default_resources()
    )
    report_definitions(settings, exported)
    ahead = settings.runtime.spawn_ahead if spawn_ahead is None else spawn_ahead
    spawn = SpawnRuntime(launcher, ahead=ahead)
    runtimes: dict[Mode, Runtime] = {"spawn": spawn}
    warm = None
    if settings.uses_warm_mode:
        warm = WarmRuntime(
            launcher,
            warm_processes or slots,
            max_calls_per_process=settings.runtime.max_calls_per_process,
            max_rss_mb=settings.runtime.max_process_rss_mb,
            permissions=profiles.default_permissions(),
            resources=profiles.default_resources(),
        )
        runtimes["warm"] = warm
    runtime = ByMode(runtimes, slots)
    client = redis_client(settings)
    cancels = CancelWatch(client, settings.keys)
    cancels.start()  # cancelled ids loaded before the first call is checked
    handler = CallHandler(
        settings=settings,
        profiles=profiles,
        runtime=runtime,
        breakers=Breakers(client, settings.breaker_settings, settings.keys),
        dead_letters=DeadLetters.from_settings(client, settings),
        deliveries=Deliveries(client, settings.redelivery_s * (MAX_DELIVERIES + 2), settings.keys),
        metrics=metrics or Metrics(),
        sandbox="bwrap" if launcher.sandbox is not None else "none",
        sealer=sealer,
        signer=signer,
        flow=Flow(client, settings.keys),
        cancels=cancels,
        cache=ResultCache(client, settings.keys),
    )
    return WorkerParts(
        handler, runtime, warm, spawn, _spawn_keys(settings, profiles), client, slots, cancels
    )


def _check_grants(sandbox: Sandbox, settings: Settings, profiles: Profiles) -> None:
    """An ``--allow-read=PATH``/``--allow-write=PATH`` its tools' uid cannot use is said at
    start, naming the path and the fix, instead of failing each call of the tool (bwrap
    cannot mount a path behind a closed directory; past that, EACCES): a path whose mode
    bars that uid refuses the start, one that does not exist (yet) is a warning
    (docs/security/sandbox.md)."""
    barred: list[str] = []
    missing: list[str] = []
    grants = [profiles.default_permissions(), *(profiles[t].permissions for t in settings.tools)]
    for permissions in grants:
        bars, gaps = sandbox.grant_problems(permissions)
        barred += [problem for problem in bars if problem not in barred]
        missing += [problem for problem in gaps if problem not in missing]
    for problem in missing:
        log.warning("a grant its tools cannot use yet: %s (the sandbox leaves it out)", problem)
    if barred:
        raise ConfigError(
            f"{settings.source}: runtime.permissions: a grant its tools cannot use: "
            + "; ".join(barred),
            key="runtime.permissions",
            source=settings.source,
        )


def _spawn_keys(settings: Settings, profiles: Profiles) -> list[Key]:
    """What the tools known to spawn are started with (the runtime's own if spawn is its
    mode); a tool met only later gets processes ahead of demand after its first call."""
    keys: list[Key] = []
    if settings.runtime.mode == "spawn":
        keys.append((profiles.default_permissions(), profiles.default_resources()))
    for tool_id in settings.tools:
        profile = profiles[tool_id]
        key = (profile.permissions, profile.resources)
        if profile.mode == "spawn" and key not in keys:
            keys.append(key)
    return keys
