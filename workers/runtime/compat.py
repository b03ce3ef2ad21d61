"""What Compozy gives every tool process beyond the call's own env, given here too."""

from __future__ import annotations

from pathlib import Path

COMPOZY_RUNTIME = "worker"
"""Compozy's value of ``COMPOZY_RUNTIME``: tools test it for "running under Compozy"."""


def compozy_environment(project_dir: Path) -> dict[str, str]:
    """``COMPOZY_RUNTIME`` and ``COMPOZY_PROJECT_ROOT`` (the project root as the tool sees
    it: the sandbox binds the project at its own host path, so the two agree)."""
    return {"COMPOZY_RUNTIME": COMPOZY_RUNTIME, "COMPOZY_PROJECT_ROOT": str(project_dir)}
