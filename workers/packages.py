"""`toolq install`: a project's packages, installed by the Bun the workers run.

toolq runs Bun with ``--no-install``, so a project with a ``package.json`` needs its
packages installed once, where the workers run (or in the image). ``bun`` is rarely
on a newcomer's PATH; the pinned one the workers use (:func:`find_bun`) is. This
module also explains the dependencies Bun cannot resolve on its own, for the command
and for a worker's start-up check alike:

- ``workspace:*`` — a package of the monorepo the project belongs to: it installs only
  from inside that workspace (a directory above whose ``package.json`` lists
  ``workspaces`` covering the project);
- ``npm:`` / ``jsr:`` import specifiers — Deno's; Bun resolves bare package names
  from ``package.json``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from toolq.errors import ConfigError
from toolq.workers.runtime.bun import find_bun
from toolq.workers.runtime.workspace import manifest, workspace_root

INSTALL_TIMEOUT_S = 600.0
_DENO_IMPORT = re.compile(r"""Cannot find (?:package|module) ['"]((?:npm|jsr):[^'"]+)['"]""")
_MISSING = re.compile(r"""Cannot find (?:package|module) ['"]([^'"]+)['"]""")


def install_command(project_dir: Path) -> str:
    """The command that installs this project's packages, for messages."""
    return f"toolq install {project_dir}"


def workspace_dependencies(project_dir: Path) -> dict[str, str]:
    """Dependencies written ``workspace:…`` in the project's package.json, by name."""
    data = manifest(project_dir) or {}
    found: dict[str, str] = {}
    for section in ("dependencies", "devDependencies", "optionalDependencies"):
        deps = data.get(section)
        if isinstance(deps, dict):
            found.update(
                {
                    name: spec
                    for name, spec in deps.items()
                    if isinstance(spec, str) and spec.startswith("workspace:")
                }
            )
    return found


def workspace_problem(project_dir: Path) -> str | None:
    """Why ``workspace:`` dependencies cannot be installed here, or None."""
    deps = workspace_dependencies(project_dir)
    if not deps or workspace_root(project_dir) is not None:
        return None
    named = ", ".join(f'"{name}": "{spec}"' for name, spec in sorted(deps.items()))
    return (
        f"{project_dir}/package.json has workspace dependencies ({named}): packages of the "
        "monorepo this project was taken from, which Bun installs only inside that "
        "workspace. Keep the project in its workspace (a directory above it whose "
        "package.json lists it under `workspaces`), or replace each with a `file:` path "
        "to the package (or its published version), then run "
        f"`{install_command(project_dir)}`"
    )


def missing_module_hint(project_dir: Path, text: str) -> str | None:
    """What to do about a module Bun could not resolve (its error ``text``), or None
    when the text names no missing module."""
    deno = _DENO_IMPORT.search(text)
    if deno is not None:
        specifier = deno.group(1)
        scheme, _, rest = specifier.partition(":")
        name = _package_name(rest)
        if scheme == "jsr":
            return (
                f"{specifier!r} is a Deno import (a JSR package), which Bun does not "
                f"resolve: use the package's npm release (import it by its name) or copy "
                "the module into the project"
            )
        return (
            f"{specifier!r} is a Deno-style npm: import, which Bun does not resolve: import "
            f"{name!r} instead, list it in package.json's dependencies and run "
            f"`{install_command(project_dir)}`"
        )
    missing = _MISSING.search(text)
    if missing is None:
        return None
    problem = workspace_problem(project_dir)
    if problem is not None:
        return problem
    if manifest(project_dir) is not None:
        return (
            f"its dependencies are not installed ({missing.group(1)!r} is missing): run "
            f"`{install_command(project_dir)}` (the Bun the workers run; toolq runs Bun "
            "with --no-install and never installs packages itself)"
        )
    return (
        f"an imported module is missing ({missing.group(1)!r}): check the import paths "
        "(or add a package.json listing it)"
    )


def _package_name(rest: str) -> str:
    """``zod@3/v4`` -> ``zod``; ``@scope/pkg@1`` -> ``@scope/pkg``."""
    parts = rest.split("/")
    name = "/".join(parts[:2]) if rest.startswith("@") else parts[0]
    return name.rsplit("@", 1)[0] if name.count("@") > (1 if name.startswith("@") else 0) else name


def install(
    project_dir: Path, bun_path: str | None = None, args: list[str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``bun install`` (the workers' Bun) in the project; output goes to the
    terminal. :class:`ConfigError` for a project without package.json, or with
    workspace dependencies outside their workspace (Bun could only fail)."""
    project_dir = project_dir.resolve()
    if manifest(project_dir) is None:
        raise ConfigError(
            f"{project_dir}: no package.json (or not a JSON object): nothing to install; "
            "a project without dependencies needs no install"
        )
    problem = workspace_problem(project_dir)
    if problem is not None:
        raise ConfigError(problem)
    bun = find_bun(bun_path, project_dir)
    return subprocess.run(
        [str(bun), "install", *(args or [])], cwd=project_dir, timeout=INSTALL_TIMEOUT_S
    )
