"""Finding Compozy's tool definitions: the ``tools/*.yaml`` files found by ``autoload``
and the entries of the project file's ``tools:`` list, read once by the loader for
producers and workers alike; each is checked by
:func:`toolq.config.tooldefs.parse_definition`. Definitions written where toolq does not
read them (Deno-era ``execute:`` files, tools inside workflow files) are reported as
notes, not run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolq.config.tooldefs import ToolDefinition, parse_definition
from toolq.errors import ConfigError


@dataclass
class Definitions:
    """What the loader gets back: the definitions and their toolq-settings layers."""

    tools: dict[str, ToolDefinition] = field(default_factory=dict)
    layers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Deno-era definitions found and not run, each naming the tool and what to do."""

    def add(
        self,
        raw: Mapping[str, Any],
        source: str,
        scopes: Mapping[str, Any] | None = None,
    ) -> None:
        definition, settings = parse_definition(raw, source, scopes)
        earlier = self.tools.get(definition.id)
        if earlier is not None:
            raise ConfigError(
                f"{source}: tool {definition.id!r} is defined twice (also in {earlier.source})",
                key=f"tools.{definition.id}",
                source=source,
            )
        self.tools[definition.id] = definition
        if settings:
            self.layers.append((source, {"tools": {definition.id: settings}}))


def load_definitions(
    project_dir: Path,
    autoload: Any,
    tools: list[Any] | None,
    source: str,
    project: Mapping[str, Any] | None = None,
) -> Definitions:
    """Definitions from ``autoload`` (files with ``resource: tool``) and the ``tools:``
    list (objects; bare strings are id selectors and define nothing). ``project`` is the
    project file's content, which ``$global::`` schema references point into."""
    found = Definitions()
    project = project or {}
    for path in autoload_files(project_dir, autoload, source):
        raw = _read(path)
        if isinstance(raw, Mapping) and raw.get("resource") == "tool":
            found.add(raw, str(path), {"global": project, "local": raw})
            _note_execute(found, raw, str(path))
        elif isinstance(raw, Mapping) and raw.get("resource") == "workflow":
            _note_workflow_tools(found, raw, path)
    for index, entry in enumerate(tools or []):
        where = f"{source}: tools[{index}]"
        if isinstance(entry, str):
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"{where}: expected a tool definition or a tool id, got {type(entry).__name__}",
                key=f"tools[{index}]",
                source=source,
            )
        found.add(entry, where, {"global": project, "local": project})
        _note_execute(found, entry, where)
    for path in _workflow_files(project_dir, project.get("workflows")):
        raw = _read_quietly(path)
        if isinstance(raw, Mapping):
            _note_workflow_tools(found, raw, path)
    return found


# -- Deno-era definitions (found, reported, not run) -------------------------------------

_PORTING = "see docs/compozy.md, 'Bringing a Deno-era project over'"


def _note_execute(found: Definitions, raw: Mapping[str, Any], source: str) -> None:
    """A definition with ``execute:`` (Compozy's Deno runtime ran one file per tool)."""
    execute = raw.get("execute")
    if execute is None:
        return
    found.notes.append(
        f"tool {raw.get('id')} ({source}) has execute: {execute}, a Deno-era tool file "
        "toolq does not run: toolq runs the tools the entrypoint exports, so import its "
        f"function there and add it to the default export under {raw.get('id')!r} "
        f"({_PORTING})"
    )


def _note_workflow_tools(found: Definitions, raw: Mapping[str, Any], path: Path) -> None:
    """Tool definitions written inside a workflow file (Deno-era projects)."""
    tools = raw.get("tools")
    if not isinstance(tools, list):
        return
    for entry in tools:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            continue
        if entry["id"] in found.tools:
            continue  # also defined where toolq reads definitions
        found.notes.append(
            f"tool {entry['id']} is defined inside the workflow file {path}, where toolq "
            f"does not read definitions: move it to tools/{entry['id']}.yaml (resource: "
            "tool) and export its function from the entrypoint"
            + (" (its execute: file is not run)" if "execute" in entry else "")
            + f" ({_PORTING})"
        )


def _workflow_files(project_dir: Path, workflows: Any) -> list[Path]:
    """The project file's ``workflows: [{source: ...}]`` inside the project."""
    files = []
    for entry in workflows if isinstance(workflows, list) else []:
        source = entry.get("source") if isinstance(entry, Mapping) else None
        if not isinstance(source, str):
            continue
        path = (project_dir / source).resolve()
        if path.is_relative_to(project_dir) and path.is_file():
            files.append(path)
    return files


def _read_quietly(path: Path) -> Any:
    """A file toolq only looks into (a workflow): unreadable is Compozy's business."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def autoload_files(project_dir: Path, autoload: Any, source: str) -> list[Path]:
    """Files ``autoload.include`` matches, less ``exclude`` (globs relative to the
    project; ``**`` recurses), when ``enabled`` is true."""
    if autoload is None:
        return []
    if not isinstance(autoload, Mapping):
        raise ConfigError(f"{source}: autoload: expected a mapping", "autoload", source)
    if autoload.get("enabled") is not True:
        return []
    include, exclude = _globs(autoload, "include", source), _globs(autoload, "exclude", source)
    excluded = {p.resolve() for pattern in exclude for p in _glob(project_dir, pattern, source)}
    files: dict[Path, None] = {}
    for pattern in include:
        for path in sorted(_glob(project_dir, pattern, source)):
            resolved = path.resolve()
            if path.is_file() and resolved not in excluded:
                files[resolved] = None
    return list(files)


def _globs(autoload: Mapping[str, Any], key: str, source: str) -> list[str]:
    value = autoload.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: autoload.{key}: expected a list of globs", key, source)
    return value


def _glob(project_dir: Path, pattern: str, source: str) -> list[Path]:
    if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise ConfigError(
            f"{source}: autoload: {pattern!r} must stay inside the project directory",
            "autoload",
            source,
        )
    return list(project_dir.glob(pattern))


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", source=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}", source=str(path)) from None
