"""Packages a project's ``node_modules`` links to from outside the project.

A project inside a Bun (or npm/pnpm) workspace gets its ``workspace:*`` dependencies
as symlinks to the workspace's own packages (``node_modules/@market/pricing ->
../../../packages/pricing``). The sandbox shows a tool only the project directory, so
those links would dangle inside it and the entrypoint would not load. The sandbox
binds each such package read-only at its own path: only the linked packages, not the
rest of the workspace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_LINKS = 256
"""More linked packages than this are not bound (a node_modules this odd is not a
workspace's): the start-up check then says what is missing."""


def linked_packages(project_dir: Path) -> list[str]:
    """Packages outside ``project_dir`` that ``node_modules`` entries (``name`` and
    ``@scope/name``) link to, resolved, sorted: only members of the workspace the
    project belongs to (a link anywhere else, say one a package's install script made
    to a home directory or to the workspace root, is never shown)."""
    project = project_dir.resolve()
    modules = project / "node_modules"
    root = workspace_root(project)
    if root is None or not modules.is_dir():
        return []
    entries: list[Path] = []
    for entry in modules.iterdir():
        if entry.name.startswith("@") and entry.is_dir() and not entry.is_symlink():
            entries.extend(entry.iterdir())
        else:
            entries.append(entry)
    found: set[str] = set()
    for entry in entries:
        if not entry.is_symlink():
            continue
        target = entry.resolve()
        if target.is_dir() and not target.is_relative_to(project) and is_member(target, root):
            found.add(str(target))
    return sorted(found)[:MAX_LINKS]


def manifest(project_dir: Path) -> dict[str, Any] | None:
    """The project's ``package.json`` (None: none, or not a JSON object)."""
    try:
        data = json.loads((project_dir / "package.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def workspace_root(project_dir: Path) -> Path | None:
    """The nearest directory above the project whose package.json lists workspaces that
    include it (Bun installs a member from there), or None."""
    project = project_dir.resolve()
    for directory in project.parents:
        if is_member(project, directory):
            return directory
    return None


def is_member(path: Path, root: Path) -> bool:
    """Whether ``root``'s package.json lists ``path`` among its workspaces."""
    patterns = (manifest(root) or {}).get("workspaces")
    if isinstance(patterns, dict):  # {"packages": [...]} (yarn's form)
        patterns = patterns.get("packages")
    return isinstance(patterns, list) and any(
        isinstance(pattern, str) and path.match(str(root / pattern)) for pattern in patterns
    )
