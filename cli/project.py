"""Commands for setting a project up: `install` (its packages, with the workers' Bun),
`config` (the effective settings) and `keygen` (a secret key)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from toolq.cli.common import EXIT_FAILED, ConfigOption, ProfileOption, fail, guard, load


def install(
    project: Annotated[
        Path | None,
        typer.Argument(
            help="The project directory (or its compozy.yaml); default: the configured project."
        ),
    ] = None,
    config: ConfigOption = None,
    profile: ProfileOption = None,
) -> None:
    """Install the project's packages (its package.json) with the Bun the workers run.

    Workers run Bun with --no-install: run this once where they run (or in the image).
    Exit 1 if Bun's install failed, 2 if there is nothing Bun could install."""
    from toolq.config.loader import load_settings
    from toolq.workers.packages import install as install_packages

    project_dir = None
    if project is not None:
        if not project.exists():
            fail(f"{project}: no such project directory or file")
        project_dir = (project if project.is_dir() else project.parent).resolve()
        if config is None:
            own = project if project.is_file() else project_dir / "compozy.yaml"
            config = own if own.is_file() else None
    settings = guard(lambda: load_settings(config, profile))
    target = project_dir or settings.project_dir
    done = guard(lambda: install_packages(target, settings.runtime.bun_path))
    if done.returncode != 0:
        fail(f"bun install in {target} failed (exit code {done.returncode})", EXIT_FAILED)


def show_config(config: ConfigOption = None, profile: ProfileOption = None) -> None:
    """Print the effective settings (after profile, file, TOOLQ_* and defaults) as JSON."""
    from toolq.config.settings import redact_url

    settings = load(config, profile)
    data = settings.model_dump(mode="json", by_alias=True)
    data["redis_url"] = redact_url(data["redis_url"])
    data["_source"] = settings.source
    data["_project"] = settings.project
    data["_tool_definitions"] = {
        tool_id: {
            "source": d.source,
            "description": d.description,
            "input_schema": d.input_schema is not None,
            "output_schema": d.output_schema is not None,
            "with": dict(d.defaults),
            "config": dict(d.config),
            "env": sorted(d.env),  # names only: values may be secrets or templates of them
        }
        for tool_id, d in sorted(settings.definitions.items())
    }
    typer.echo(json.dumps(data, indent=2))


def keygen() -> None:
    """Print a new secret key for TOOLQ_SECRET_KEY: it seals call env and signs calls
    (a worker with a key runs only signed calls; see docs/security/secrets.md)."""
    from cryptography.fernet import Fernet

    typer.echo(Fernet.generate_key().decode())
