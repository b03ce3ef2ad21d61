"""Compozy's tool definitions: one definition checked into a :class:`ToolDefinition`.

A definition (``resource: tool``) carries ``id``, ``description``, ``timeout``,
``input`` and ``output`` (JSON Schema, draft 7), ``with`` (default input), ``config``
(the tool's second argument) and ``env`` (values may be ``{{ .env.NAME }}``
templates, resolved from the *worker's* environment at call time). Its ``timeout``,
and any of toolq's per-tool settings written beside it (``hard_timeout``, ``mode``,
``retry``…), become a settings layer below the project file's own ``tools.<id>``
mapping — see :mod:`toolq.config.loader` for the precedence.

Finding the definitions (the ``tools/*.yaml`` files found by ``autoload`` and the
entries of the project file's ``tools:`` list, read once by the loader for producers
and workers alike) is :mod:`toolq.config.toolfiles`; resolving Compozy's schema
references (``$ref: $global::schemas.#(id=="quote")``) is
:mod:`toolq.config.schemarefs`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft7Validator
from jsonschema.exceptions import SchemaError, best_match
from jsonschema_specifications import REGISTRY as SPECIFICATIONS

from toolq.config.schemarefs import resolve_refs
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
