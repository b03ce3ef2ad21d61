"""Compozy's tool definitions: the ``tools/*.yaml`` files found by ``autoload`` and the
entries of the project file's ``tools:`` list, read once by the loader for producers
and workers alike.

A definition (``resource: tool``) carries ``id``, ``description``, ``timeout``,
``input`` and ``output`` (JSON Schema, draft 7), ``with`` (default input), ``config``
(the tool's second argument) and ``env`` (values may be ``{{ .env.NAME }}``
templates, resolved from the *worker's* environment at call time). Its ``timeout``,
and any of toolq's per-tool settings written beside it (``hard_timeout``, ``mode``,
``retry``…), become a settings layer below the project file's own ``tools.<id>``
mapping — see :mod:`toolq.config.loader` for the precedence.

Schemas may use Compozy's references, ``$ref: $global::schemas.#(id=="quote")``: a
path into the project file (``$global::``/``global::``) or into the definition's own
file (``local::``), with ``#(key=="value")`` selecting from a list. They are resolved
here, once, into plain JSON Schema (the entry's Compozy ``id`` dropped, keys written
beside the ``$ref`` kept over the target's). A reference that does not resolve is a
:class:`ConfigError` naming the file and the schema path; so is any other ``$ref`` that
is not a pointer into the schema itself (``#/definitions/...``): toolq never fetches a
schema.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import SchemaError, best_match
from jsonschema_specifications import REGISTRY as SPECIFICATIONS

from toolq.config.settings import ToolSettings
from toolq.errors import ConfigError, InvalidInput
from toolq.validation import ENV_KEY, FORBIDDEN_ENV_KEYS, validate_tool_id

DEFINITION_KEYS = frozenset(
    {"resource", "id", "description", "timeout", "input", "output", "with", "config", "env"}
)
"""What toolq reads from a Compozy tool definition."""
TOOLQ_TOOL_KEYS = frozenset(info.alias or name for name, info in ToolSettings.model_fields.items())
"""toolq's own per-tool settings, also accepted inside a definition."""
COMPOZY_DEFINITION_KEYS = frozenset({"$schema", "metadata", "tags", "version", "cwd", "schema"})
"""Other keys of Compozy's tool config: accepted and ignored."""

_ENV_TEMPLATE = re.compile(r"\{\{\s*\.env\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_SUGGEST_CUTOFF = 0.8


def suggest(key: str, valid: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest valid key, or nothing."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=_SUGGEST_CUTOFF)
    return f" (did you mean {close[0]!r}?)" if close else ""


def looks_like_typo(key: str, valid: Any) -> bool:
    return bool(difflib.get_close_matches(key, sorted(valid), n=1, cutoff=_SUGGEST_CUTOFF))


@dataclass(frozen=True)
class ToolDefinition:
    """One tool's definition, checked; the schemas compiled once."""

    id: str
    source: str
    description: str | None = None
    input_schema: Mapping[str, Any] | None = None
    output_schema: Mapping[str, Any] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """``with``: shallow-merged under the call's input (the call wins)."""
    config: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    """Values as written: templates are resolved per call, never stored resolved."""
    _input: Draft7Validator | None = field(default=None, compare=False, repr=False)
    _output: Draft7Validator | None = field(default=None, compare=False, repr=False)

    def effective_input(self, call_input: Any) -> Any:
        """``with`` under the call's input (shallow; the call wins); a non-object input
        is left to the schema."""
        if not self.defaults:
            return call_input
        if call_input is None:
            return dict(self.defaults)
        if isinstance(call_input, Mapping):
            return {**self.defaults, **call_input}
        return call_input

    def check_input(self, value: Any) -> None:
        """:class:`InvalidInput` naming the failing field, if ``input`` refuses it."""
        problem = _first_error(self._input, value, "input")
        if problem is not None:
            raise InvalidInput(
                f"input does not match tool {self.id}'s input schema: {problem}",
                "ValidationError",
            )

    def output_problem(self, result: Any) -> str | None:
        """Why ``result`` breaks the ``output`` schema, or None."""
        return _first_error(self._output, result, "result")

    def resolve_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The definition's env with ``{{ .env.NAME }}`` taken from ``environ`` (the
        worker's). A variable the worker does not have refuses the call."""
        resolved = {}
        for key, template in self.env.items():

            def lookup(match: re.Match[str], key: str = key) -> str:
                name = match.group(1)
                if name not in environ:
                    raise InvalidInput(
                        f"tool {self.id}: env {key} takes {{{{ .env.{name} }}}}, which is not "
                        "set in the worker's environment",
                        "ConfigError",
                    )
                return environ[name]

            resolved[key] = _ENV_TEMPLATE.sub(lookup, template)
        return resolved

    def env_variables(self) -> set[str]:
        """Worker variables the templates read."""
        return {m.group(1) for value in self.env.values() for m in _ENV_TEMPLATE.finditer(value)}


def _first_error(validator: Draft7Validator | None, value: Any, root: str) -> str | None:
    if validator is None:
        return None
    try:
        error = best_match(validator.iter_errors(value))
    except Exception as exc:  # a schema checked at load never gets here; never a crash
        return f"{root}: the schema cannot be applied: {type(exc).__name__}: {exc}"
    if error is None:
        return None
    path = [str(part) for part in error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, Mapping):
        missing = [name for name in error.validator_value if name not in error.instance]
        if missing:
            path.append(str(missing[0]))  # name the missing field, not its parent
    where = ".".join([root, *path])
    return f"{where}: {error.message}"


# -- reading definitions ---------------------------------------------------------------


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


def parse_definition(
    raw: Mapping[str, Any], source: str, scopes: Mapping[str, Any] | None = None
) -> tuple[ToolDefinition, dict[str, Any]]:
    """A definition and the toolq per-tool settings written in it (``timeout`` too).
    ``scopes``: what ``$global::`` and ``local::`` schema references read (the project
    file's content, the definition's file's)."""

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {message}", key=key, source=source)

    tool_id = raw.get("id")
    if not isinstance(tool_id, str):
        raise fail("id", "a tool definition needs an id (a string)")
    try:
        validate_tool_id(tool_id)
    except InvalidInput as exc:
        raise fail("id", exc.message) from None
    known = DEFINITION_KEYS | TOOLQ_TOOL_KEYS
    for key in raw:
        if key not in known and key not in COMPOZY_DEFINITION_KEYS and looks_like_typo(key, known):
            raise fail(key, f"unknown key{suggest(key, known)}")

    schemas: dict[str, Draft7Validator | None] = {}
    resolved: dict[str, Any] = {}
    for key in ("input", "output"):
        schema = raw.get(key)
        if schema is None:
            schemas[key] = None
            continue
        if not isinstance(schema, Mapping):
            raise fail(key, "expected a JSON Schema object")
        schema = resolved[key] = resolve_refs(schema, key, scopes or {}, fail)
        try:
            Draft7Validator.check_schema(schema)
        except SchemaError as exc:
            raise fail(key, f"not a valid JSON Schema (draft 7): {exc.message}") from None
        # Formats are checked as Compozy's validator does (email, ipv4, date, ...). The
        # registry holds the specifications only: nothing is ever fetched.
        schemas[key] = Draft7Validator(
            schema, format_checker=Draft7Validator.FORMAT_CHECKER, registry=SPECIFICATIONS
        )

    defaults, config = raw.get("with") or {}, raw.get("config") or {}
    if not isinstance(defaults, Mapping):
        raise fail("with", "expected a mapping (the tool's default input)")
    if not isinstance(config, Mapping):
        raise fail("config", "expected a mapping (the tool's second argument)")
    description = raw.get("description")
    definition = ToolDefinition(
        id=tool_id,
        source=source,
        description=description if isinstance(description, str) else None,
        input_schema=resolved.get("input"),
        output_schema=resolved.get("output"),
        defaults=dict(defaults),
        config=dict(config),
        env=_parse_env(raw.get("env"), fail),
        _input=schemas["input"],
        _output=schemas["output"],
    )
    settings = {key: raw[key] for key in TOOLQ_TOOL_KEYS if raw.get(key) is not None}
    return definition, settings


# -- Compozy's schema references ---------------------------------------------------------

_SCOPES = {"$global": "global", "global": "global", "$local": "local", "local": "local"}
_SELECTOR = re.compile(r"""#\(\s*([A-Za-z0-9_$-]+)\s*==\s*(?:"([^"]*)"|'([^']*)'|([^)\s]*))\s*\)""")
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
"""Keywords whose values are data, not schemas: a ``$ref`` key there is not a reference."""


def resolve_refs(
    schema: Mapping[str, Any], where: str, scopes: Mapping[str, Any], fail: Any
) -> Any:
    """``schema`` with Compozy's ``$global::…``/``local::…`` references replaced by what
    they point at; other ``$ref`` values must point into the schema itself."""

    def visit(node: Any, path: str, seen: frozenset[str]) -> Any:
        if isinstance(node, list):
            return [visit(item, f"{path}[{i}]", seen) for i, item in enumerate(node)]
        if not isinstance(node, Mapping):
            return node
        here = {
            key: value if key in _DATA_KEYWORDS else visit(value, f"{path}.{key}", seen)
            for key, value in node.items()
            if key != "$ref"
        }
        ref = node.get("$ref")
        if ref is None:
            return here
        at = f"{path}.$ref"
        if not isinstance(ref, str):
            raise fail(at, f"expected a string, got {type(ref).__name__}")
        scope, separator, target_path = ref.partition("::")
        if not separator:
            if not ref.startswith("#"):
                raise fail(
                    at,
                    f"{ref!r}: toolq resolves Compozy's $global::schemas references and "
                    "pointers into the schema itself (#/...), and never fetches a schema",
                )
            here["$ref"] = ref
            return here
        if scope not in _SCOPES:
            raise fail(at, f"{ref!r}: unknown scope {scope!r} (use $global:: or local::)")
        if ref in seen:
            raise fail(at, f"{ref!r} refers back to itself")
        try:
            target = _walk(scopes.get(_SCOPES[scope]) or {}, target_path)
        except LookupError as exc:
            raise fail(at, f"{ref!r} does not resolve: {exc}") from None
        if not isinstance(target, Mapping):
            raise fail(at, f"{ref!r} points at a {type(target).__name__}, not a schema")
        inner = visit({k: v for k, v in target.items() if k != "id"}, path, seen | {ref})
        return {**inner, **here}

    resolved = visit(schema, where, frozenset())
    _check_pointers(resolved, resolved, where, fail)
    return resolved


def _check_pointers(node: Any, root: Any, path: str, fail: Any) -> None:
    """Every remaining ``$ref`` (``#/...``) points at something in ``root``."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_pointers(item, root, f"{path}[{i}]", fail)
        return
    if not isinstance(node, Mapping):
        return
    ref = node.get("$ref")
    if isinstance(ref, str):
        target: Any = root
        for part in ref.removeprefix("#").strip("/").split("/") if ref not in ("#", "#/") else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise fail(f"{path}.$ref", f"{ref!r} does not resolve inside the schema")
    for key, value in node.items():
        if key != "$ref" and key not in _DATA_KEYWORDS:
            _check_pointers(value, root, f"{path}.{key}", fail)


def _walk(node: Any, path: str) -> Any:
    """Follow a GJSON-style path (``schemas.#(id=="quote").properties``)."""
    for part in _split_path(path):
        selector = _SELECTOR.fullmatch(part)
        if selector is not None:
            if not isinstance(node, list):
                raise LookupError(f"{part} selects from a list, found {type(node).__name__}")
            key = selector.group(1)
            value = next(group for group in selector.groups()[1:] if group is not None)
            found = [
                item for item in node if isinstance(item, Mapping) and str(item.get(key)) == value
            ]
            if not found:
                ids = [str(item.get(key)) for item in node if isinstance(item, Mapping)]
                raise LookupError(
                    f"no entry with {key} == {value!r} (entries: {', '.join(ids) or 'none'})"
                )
            node = found[0]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise LookupError(f"{part!r} not found")
    return node


def _split_path(path: str) -> list[str]:
    """``a.#(id=="x.y").b`` -> ``["a", '#(id=="x.y")', "b"]``: dots inside a selector stay."""
    parts: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for ch in path:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "." and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    if any(not part for part in parts):
        raise LookupError(f"{path!r} is not a path")
    return parts


def _parse_env(env: Any, fail: Any) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise fail("env", "expected a mapping of names to values")
    parsed = {}
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_KEY.fullmatch(key) or key in FORBIDDEN_ENV_KEYS:
            raise fail(f"env.{key}", "not an allowed env name (A-Z, 0-9, '_')")
        if isinstance(value, bool | int | float):
            value = str(value).lower() if isinstance(value, bool) else str(value)
        if not isinstance(value, str):
            raise fail(f"env.{key}", "expected a string")
        if "{{" in _ENV_TEMPLATE.sub("", value):
            raise fail(
                f"env.{key}",
                "only {{ .env.NAME }} templates can be resolved outside Compozy's workflows",
            )
        if any(ch in value for ch in "\r\n\x00"):
            raise fail(f"env.{key}", "must not contain CR, LF or NUL")
        parsed[key] = value
    return parsed
