"""Load :class:`Settings` with one precedence, lowest first:

1. built-in defaults (Compozy's `DefaultConfig`);
2. a profile (`--profile` / ``TOOLQ_PROFILE``): `production` or `development`,
   shipped as YAML beside this module;
3. the project file (`--config` / ``TOOLQ_CONFIG``, else `./compozy.yaml` if present):
   first the toolq settings its tool definitions carry (``autoload`` files and the
   ``tools:`` list, :mod:`toolq.config.toolfiles`), then its own toolq keys; Compozy's
   other keys are accepted and ignored, Compozy's runtime names mapped onto toolq's;
4. environment variables: ``TOOLQ_<KEY>`` for top-level keys (``TOOLQ_REDIS_URL``),
   ``TOOLQ_<SECTION>__<KEY>`` for nested ones (``TOOLQ_RUNTIME__TIMEOUT=10s``);
5. explicit overrides from the caller (command-line flags).

Every error names the key and the file or variable it came from. This is the
only place that reads ``TOOLQ_*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from toolq.config.settings import Settings
from toolq.config.tooldefs import looks_like_typo, suggest
from toolq.config.toolfiles import Definitions, load_definitions
from toolq.errors import ConfigError

PROFILES = ("development", "production")
DEFAULT_CONFIG_FILE = "compozy.yaml"
ENV_PREFIX = "TOOLQ_"
_LOADER_VARIABLES = {"TOOLQ_CONFIG", "TOOLQ_PROFILE"}

# Top-level keys of a Compozy project file that toolq does not use: accepted and
# ignored. Any other unknown top-level key is taken as Compozy's too, unless it looks
# like a typo of one of toolq's own keys (then it is an error with a suggestion).
COMPOZY_PROJECT_KEYS = frozenset(
    {
        "version",
        "description",
        "author",
        "workflows",
        "models",
        "schemas",
        "autoload",
        "config",
        "opts",
        "cache",
        "monitoring",
        "memory",
        "memories",
        "mcps",
        "templates",
        "temporal",
        "database",
        "knowledge",
        "knowledge_bases",
        "embedders",
        "vector_dbs",
        "providers",
        "agents",
        "tasks",
        "signals",
        "webhooks",
        "schedules",
    }
)
TOOLQ_KEYS = frozenset(info.alias or name for name, info in Settings.model_fields.items())
"""toolq's own top-level keys (``tools`` is shared: a list is Compozy's, a mapping toolq's)."""
RUNTIME_ALIASES = {"tool_execution_timeout": "timeout"}
"""Compozy's names for toolq's runtime keys."""
RUNTIME_IGNORED = frozenset({"native_tools"})
"""Compozy runtime keys toolq accepts and ignores (Compozy's built-in tools are not toolq's)."""

Layer = tuple[str, dict[str, Any]]


def load_settings(
    config: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings, or raise :class:`ConfigError` naming key and source."""
    env = os.environ if environ is None else environ
    layers: list[Layer] = []

    profile = profile if profile is not None else env.get("TOOLQ_PROFILE") or None
    if profile is not None:
        layers.append(_profile_layer(profile))

    config_path = _config_path(config, env)
    definitions = Definitions()
    if config_path is not None:
        project_layers, definitions = _project_layers(config_path, _read_yaml(config_path))
        layers += project_layers

    env_layer = _environment_layer(env)
    if env_layer[1]:
        layers.append(env_layer)
    if overrides:
        layers.append(("command-line options", _nest(dict(overrides))))

    merged: dict[str, Any] = {}
    for source, data in layers:
        merged = _deep_merge(merged, _compozy_runtime(data, source))
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise _config_error(exc, layers) from None
    project_dir = config_path.parent.resolve() if config_path else Path.cwd().resolve()
    source = str(config_path) if config_path else "defaults"
    settings = settings.located(project_dir, source).with_definitions(
        definitions.tools, tuple(definitions.notes)
    )
    if not settings.entrypoint_path.is_relative_to(project_dir):
        raise ConfigError(
            f"{source}: runtime.entrypoint: {settings.runtime.entrypoint} resolves to "
            f"{settings.entrypoint_path}, outside the project directory {project_dir}",
            key="runtime.entrypoint",
            source=source,
        )
    return settings


def _config_path(config: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    if config is not None:
        named: str | os.PathLike[str] | None = config
        origin = "--config"
    else:
        named, origin = env.get("TOOLQ_CONFIG") or None, "TOOLQ_CONFIG"
    if named is None:
        default = Path(DEFAULT_CONFIG_FILE)
        return default.resolve() if default.is_file() else None
    path = Path(named).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found (from {origin})", source=str(path))
    return path.resolve()


def _profile_layer(name: str) -> Layer:
    if name not in PROFILES:
        raise ConfigError(
            f"unknown profile {name!r}; available: {', '.join(PROFILES)}", key="profile"
        )
    resource = resources.files("toolq.config").joinpath(f"{name}.yaml")
    with resources.as_file(resource) as path:
        return (f"profile {name} ({path.name})", _read_yaml(path))


def _project_layers(path: Path, data: dict[str, Any]) -> tuple[list[Layer], Definitions]:
    """A Compozy project file as settings layers: its tool definitions' toolq settings
    (lowest), then toolq's own keys; every other key is Compozy's and ignored."""
    source = str(path)
    own: dict[str, Any] = {}
    for key, value in data.items():
        if key in TOOLQ_KEYS and key != "tools":
            own[key] = value
        elif key in COMPOZY_PROJECT_KEYS or key == "tools":
            continue
        elif looks_like_typo(key, TOOLQ_KEYS):
            raise ConfigError(
                f"invalid configuration: {source}: {key}: unknown key{suggest(key, TOOLQ_KEYS)}",
                key=key,
                source=source,
            )
    tools = data.get("tools")
    if tools is not None and not isinstance(tools, list):
        own["tools"] = tools  # toolq's mapping of per-tool settings (validated as such)
    found = load_definitions(
        path.parent.resolve(),
        data.get("autoload"),
        tools if isinstance(tools, list) else None,
        source,
        project=data,
    )
    return [*found.layers, (source, own)], found


def _compozy_runtime(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Compozy's runtime key names mapped onto toolq's; its ignored ones dropped."""
    runtime = data.get("runtime")
    if not isinstance(runtime, dict):
        return data
    runtime = dict(runtime)
    for compozy, toolq in RUNTIME_ALIASES.items():
        if compozy in runtime:
            if toolq in runtime:
                raise ConfigError(
                    f"invalid configuration: {source}: runtime: set {toolq} or {compozy} "
                    "(the same setting), not both",
                    key=f"runtime.{compozy}",
                    source=source,
                )
            runtime[toolq] = runtime.pop(compozy)
    for key in RUNTIME_IGNORED:
        runtime.pop(key, None)
    return {**data, "runtime": runtime}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", source=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}",
            source=str(path),
        )
    if "secret_key" in data:  # a key in a file is a key in version control
        raise ConfigError(
            f"{path}: secret_key: not allowed in a file; set TOOLQ_SECRET_KEY or point "
            "secret_key_file at a file only the workers and producers can read",
            key="secret_key",
            source=str(path),
        )
    return data


def _environment_layer(env: Mapping[str, str]) -> Layer:
    data: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in _LOADER_VARIABLES:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        value: Any = raw
        if raw.strip().startswith(("[", "{")):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise ConfigError(
                    f"environment variable {name}: not a valid list or mapping", key=name
                ) from None
        _set_path(data, path, value)
    return ("environment", data)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"performance.max_concurrent_tools": 4}`` -> nested dicts."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        if value is not None:
            _set_path(nested, dotted.split("."), value)
    return nested


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _config_error(exc: ValidationError, layers: list[Layer]) -> ConfigError:
    lines = []
    first_key: str | None = None
    first_source: str | None = None
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = ".".join(loc) or "(top level)"
        source = _source_of(loc, layers)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key" + suggest(loc[-1], _valid_keys(loc[:-1]))
        elif "input" in error and loc and repr(error["input"]) not in message:
            message = f"{message} (got {error['input']!r})"
        if source.startswith("environment"):
            variable = ENV_PREFIX + "__".join(loc).upper()
            where = f"environment variable {variable}"
        else:
            where = source
        lines.append(f"{where}: {key}: {message}")
        if first_key is None:
            first_key, first_source = key, source
    text = "invalid configuration: " + "; ".join(lines)
    return ConfigError(text, key=first_key, source=first_source)


def _valid_keys(loc: list[str]) -> set[str]:
    """The keys the settings model accepts at ``loc`` (for "did you mean")."""
    node: Any = Settings
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            fields = {
                info.alias or name: info.annotation for name, info in node.model_fields.items()
            }
            node = fields.get(part)
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        else:
            return set()
        node = _unwrap_optional(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return {info.alias or name for name, info in node.model_fields.items()}
    return set()


def _unwrap_optional(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _source_of(loc: list[str], layers: list[Layer]) -> str:
    """The highest layer that sets this key (or the closest parent of it)."""
    for depth in range(len(loc), 0, -1):
        for name, data in reversed(layers):
            node: Any = data
            for part in loc[:depth]:
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return name
    return layers[-1][0] if layers else "defaults"
