"""Load :class:`Settings` with one precedence, lowest first:

1. built-in defaults (Compozy's `DefaultConfig`);
2. a profile (`--profile` / ``TOOLQ_PROFILE``): `production` or `development`,
   shipped as YAML beside this module;
3. the project file (`--config` / ``TOOLQ_CONFIG``, else `./compozy.yaml` if present);
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
from typing import Any

import yaml
from pydantic import ValidationError

from toolq.config.settings import Settings
from toolq.errors import ConfigError

PROFILES = ("development", "production")
DEFAULT_CONFIG_FILE = "compozy.yaml"
ENV_PREFIX = "TOOLQ_"
_LOADER_VARIABLES = {"TOOLQ_CONFIG", "TOOLQ_PROFILE"}

# Keys of a Compozy project file that toolq does not use: accepted and ignored so
# that an existing compozy.yaml loads unchanged. Anything else unknown is an error.
COMPOZY_PROJECT_KEYS = frozenset(
    {
        "name",
        "version",
        "description",
        "author",
        "workflows",
        "models",
        "schemas",
        "autoload",
        "opts",
        "cache",
        "monitoring",
        "memories",
        "mcps",
        "templates",
    }
)

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
    if config_path is not None:
        layers.append((str(config_path), _read_yaml(config_path, project_file=True)))

    env_layer = _environment_layer(env)
    if env_layer[1]:
        layers.append(env_layer)
    if overrides:
        layers.append(("command-line options", _nest(dict(overrides))))

    merged: dict[str, Any] = {}
    for _, data in layers:
        merged = _deep_merge(merged, data)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise _config_error(exc, layers) from None
    project_dir = config_path.parent.resolve() if config_path else Path.cwd().resolve()
    source = str(config_path) if config_path else "defaults"
    settings = settings.located(project_dir, source)
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
        return (f"profile {name} ({path.name})", _read_yaml(path, project_file=False))


def _read_yaml(path: Path, *, project_file: bool) -> dict[str, Any]:
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
    if project_file:
        data = {k: v for k, v in data.items() if k not in COMPOZY_PROJECT_KEYS}
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
            message = "unknown key"
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
