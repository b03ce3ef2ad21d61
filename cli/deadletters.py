"""`toolq dlq list | replay | purge`: the dead-letter list, the calls that failed after
their last attempt (kept by :mod:`toolq.workers.deadletter`)."""

from __future__ import annotations

import functools
import json
import time
from typing import TYPE_CHECKING, Annotated

import typer

from toolq.cli.common import (
    EXIT_FAILED,
    ConfigOption,
    JsonOption,
    ProfileOption,
    fail,
    guard,
    load,
    print_table,
)

if TYPE_CHECKING:
    from toolq.config.settings import Settings
    from toolq.workers.deadletter import DeadLetters

dlq_app = typer.Typer(
    help="The dead-letter list: calls that failed after their last attempt.", no_args_is_help=True
)


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(min=1, help="Newest N entries.")] = 50,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Show failed calls, newest first (env values are never shown)."""
    entries = guard(lambda: _dead_letters(load(config, profile)).list(limit))
    for entry in entries:
        entry["env"] = {key: "***" for key in entry.get("env") or {}}
        if "env_sealed" in entry:
            entry["env_sealed"] = "(sealed)"
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    rows = []
    for entry in entries:
        error = entry.get("error") or {}
        rows.append(
            [
                entry["id"],
                entry["tool_id"],
                error.get("kind", ""),
                str(entry.get("attempts")),
                str(entry.get("retry_stopped") or "-"),
                time.strftime("%H:%M:%S", time.localtime(entry["failed_at"])),
                str(error.get("message", ""))[:200],
            ]
        )
    print_table(
        ["id", "tool", "kind", "attempts", "stopped", "failed at", "message"],
        rows,
        empty="the dead-letter list is empty",
    )


@dlq_app.command("replay")
def dlq_replay(
    call_id: Annotated[str | None, typer.Argument(help="The failed call's id.")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every entry.")] = False,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Enqueue failed calls again (fresh attempts); prints `old-id -> new-id` per call."""
    from toolq.producers import ToolClient

    if (call_id is None) == (not replay_all):
        fail("give one call id, or --all")
    settings = load(config, profile)
    letters = _dead_letters(settings)
    client = ToolClient(settings)
    entries, refused = guard(lambda: letters.to_replay(None if replay_all else str(call_id)))
    if not replay_all and not entries and not refused:
        fail(f"no dead-letter entry {call_id}", EXIT_FAILED)
    for entry, reason in refused:
        typer.echo(f"toolq: cannot replay {entry['id']}: {reason}", err=True)
    for entry in entries:
        new_id = guard(functools.partial(letters.replay, entry, client.enqueue))
        typer.echo(f"{entry['id']} -> {new_id}")
    if refused:
        raise typer.Exit(EXIT_FAILED)


@dlq_app.command("purge")
def dlq_purge(config: ConfigOption = None, profile: ProfileOption = None) -> None:
    """Delete every dead-letter entry."""
    count = guard(lambda: _dead_letters(load(config, profile)).purge())
    typer.echo(f"purged {count} dead-letter entries")


def _dead_letters(settings: Settings) -> DeadLetters:
    from toolq.config.connections import redis_client
    from toolq.workers.deadletter import DeadLetters

    return DeadLetters.from_settings(redis_client(settings, ride_out_restarts=False), settings)
