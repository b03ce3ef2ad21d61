"""Packages a project's ``node_modules`` links to from outside the project.

A project inside a Bun (or npm/pnpm) workspace gets its ``workspace:*`` dependencies
as symlinks to the workspace's own packages (``node_modules/@market/pricing ->
../../../packages/pricing``). The sandbox shows a tool only the project directory, so
those links would dangle inside it and the entrypoint would not load. The sandbox
binds each such package read-only at its own path: only the linked packages, not the
rest of the workspace.
"""

from __future__ import annotations

from pathlib import Path

MAX_LINKS = 256
"""More linked packages than this are not bound (a node_modules this odd is not a
workspace's): the start-up check then says what is missing."""


def linked_packages(project_dir: Path) -> list[str]:
    """Directories outside ``project_dir`` that ``node_modules`` entries (``name`` and
    ``@scope/name``) link to, resolved, sorted."""
    project = project_dir.resolve()
    modules = project / "node_modules"
    if not modules.is_dir():
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
        if target.is_dir() and not target.is_relative_to(project):
            found.add(str(target))
    return sorted(found)[:MAX_LINKS]
