"""MkDocs hooks (mkdocs.yml `hooks:`): the parts of the site generated from the code.

- ``<!-- toolq:settings-reference -->`` in a page becomes the reference of every setting,
  walked from the pydantic model (:class:`toolq.config.settings.Settings`): key, YAML path,
  type, unit, default, environment variable and description (the field's description or
  its attribute docstring in ``config/settings.py``), and the values the shipped profiles
  set (``config/production.yaml``, ``config/development.yaml``).
- ``<!-- toolq:cli-reference -->`` becomes the reference of every command of the typer
  app (``from toolq.cli import app``): usage, help, arguments and options.
- ``benchmarks/results.md`` and ``benchmarks/results-unsandboxed.md`` are
  ``bench/RESULTS.md`` and ``bench/RESULTS-unsandboxed.md`` (with their charts), as the
  last ``toolq bench`` wrote them.

The functions that build the markdown import nothing of MkDocs, so tests load this file
and check the references name every setting and every command
(``tests/fast/test_docs.py``).

Over 400 lines on purpose: MkDocs loads a hook as one file by path (``hooks:``), with no
package to import siblings from.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_MARKER = "<!-- toolq:settings-reference -->"
CLI_MARKER = "<!-- toolq:cli-reference -->"
BENCH_PAGES = {
    "benchmarks/results.md": "bench/RESULTS.md",
    "benchmarks/results-unsandboxed.md": "bench/RESULTS-unsandboxed.md",
}
PROFILES = ("production", "development")

# -- settings ----------------------------------------------------------------------------

_TYPE_WORDS = {
    "Seconds": "duration",
    "TimeLimit": "duration",
    "ByteSize": "size",
    "PositiveInt": "integer > 0",
    "NonNegativeInt": "integer ≥ 0",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "str": "string",
    "SecretStr": "string (secret)",
    "Isolation": "`standard` \\| `strict`",
}


@dataclass(frozen=True)
class SettingRow:
    """One leaf setting: where it is written and what it takes."""

    section: str
    path: str
    """The YAML path, ``runtime.timeout``, ``tools.<id>.limits.max_memory_mb``."""
    type: str
    unit: str
    default: str
    env: str
    description: str


def _unwrap_optional(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _model_of(annotation: Any) -> tuple[type | None, bool]:
    """(the nested settings model, whether it sits under a mapping of ids)."""
    from pydantic import BaseModel

    annotation = _unwrap_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is dict:
        value = _unwrap_optional(get_args(annotation)[1])
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value, True
    return None, False


def _class_sources(model: type) -> dict[str, tuple[str, str]]:
    """Field name -> (annotation as written, attribute docstring) over the model's MRO."""
    found: dict[str, tuple[str, str]] = {}
    for cls in reversed(model.__mro__):
        if cls.__module__.startswith("pydantic") or cls is object:
            continue
        try:
            tree = ast.parse(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for index, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = ""
                after = body[index + 1] if index + 1 < len(body) else None
                if (
                    isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                ):
                    doc = inspect.cleandoc(after.value.value)
                found[node.target.id] = (ast.unparse(node.annotation), doc)
    return found


def _type_words(written: str) -> str:
    """``Seconds | None`` -> ``duration, or null``; ``Literal['a', 'b']`` -> ``a | b``."""
    parts = [p.strip() for p in re.split(r"\|(?![^\[]*\])", written)]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    words = []
    for part in parts:
        literal = re.fullmatch(r"(?:Annotated\[)?Literal\[(.*?)\].*", part)
        if literal:
            values = [v.strip().strip("'\"") for v in literal.group(1).split(",")]
            words.append(" \\| ".join(f"`{v}`" for v in values))
        elif part.startswith("list["):
            words.append("list of " + _type_words(part[5:-1]) + "s")
        elif part.startswith("dict[str, "):
            words.append("mapping of string to " + _type_words(part[10:-1]))
        else:
            words.append(_TYPE_WORDS.get(part, part))
    text = ", ".join(words)
    return f"{text}, or `null`" if optional else text


def _constraints(info: Any) -> str:
    marks = []
    for meta in info.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(meta, attr, None)
            if value is not None and type(meta).__name__.lower() == attr:
                marks.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(marks)


def _format_value(value: Any, kind: str) -> str:
    from toolq.config.durations import format_duration

    if value is None:
        return "`null`"
    if kind == "duration" and isinstance(value, int | float):
        return f"`{format_duration(float(value))}`"
    if kind == "size" and isinstance(value, int):
        for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value % size == 0:
                return f"`{value // size}{unit}`"
        return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | dict):
        return f"`{yaml.safe_dump(value, default_flow_style=True).strip()}`"
    return f"`{value}`"


def _parse_duration(value: Any) -> Any:
    from toolq.config.durations import parse_duration

    return parse_duration(value)


def _kind(written: str) -> str:
    if "Seconds" in written or "TimeLimit" in written:
        return "duration"
    if "ByteSize" in written:
        return "size"
    return ""


def _unit(key: str, kind: str) -> str:
    if kind == "duration":
        return "seconds"
    if kind == "size":
        return "bytes"
    if key.endswith("_mb"):
        return "MiB"
    if key.endswith("_port"):
        return "TCP port"
    return ""


def _env_name(path: str) -> str:
    return "TOOLQ_" + path.replace("<id>", "<ID>").replace(".", "__").upper().replace(
        "<ID>", "<id>"
    )


def setting_rows() -> list[SettingRow]:
    """Every leaf setting of the model, section by section, in declaration order."""
    from pydantic_core import PydanticUndefined

    from toolq.config.settings import Settings

    rows: list[SettingRow] = []
    sections: list[tuple[str, type, str]] = [("top level", Settings, "")]
    while sections:
        section, model, prefix = sections.pop(0)
        sources = _class_sources(model)
        nested: list[tuple[str, type, str]] = []
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            key = info.alias or name
            path = prefix + key
            child, per_id = _model_of(info.annotation)
            if child is not None and not per_id:
                nested.append((path, child, path + "."))
                continue
            if child is not None:
                nested.append((f"{path}.<id>", child, f"{path}.<id>."))
                continue
            written, doc = sources.get(name, ("", ""))
            kind = _kind(written)
            if info.default_factory is not None:
                default = info.default_factory()
            elif info.default is PydanticUndefined:
                default = "(required)"
            else:
                default = info.default
            type_text = _type_words(written)
            limits = [c for c in _constraints(info).split(", ") if c and c not in type_text]
            if limits:
                type_text += f" ({', '.join(limits)})"
            env = _env_name(path)
            rows.append(
                SettingRow(
                    section=section,
                    path=path,
                    type=type_text,
                    unit=_unit(key, kind),
                    default=default if default == "(required)" else _format_value(default, kind),
                    env=env,
                    description=info.description or doc,
                )
            )
        sections[0:0] = nested
    return rows


def _profile_values() -> dict[str, dict[str, Any]]:
    """Profile name -> {yaml path: value} of what it sets."""
    values: dict[str, dict[str, Any]] = {}
    for name in PROFILES:
        data = yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text()) or {}
        flat: dict[str, Any] = {}

        def walk(node: dict[str, Any], prefix: str, flat: dict[str, Any] = flat) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    flat[prefix + key] = value

        walk(data, "")
        values[name] = flat
    return values


def _cell(text: str) -> str:
    """A table cell: one line, pipes escaped, ``<x>`` shown as written."""
    text = " ".join(text.split()).replace("``", "`")
    text = re.sub(r"(?<!\\)\|", "\\|", text)
    return _escape_angles(text)


def _escape_angles(text: str) -> str:
    """``<id>`` outside code spans would be read as an HTML tag."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(
        p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in parts
    )


def settings_reference() -> str:
    """The markdown of the settings reference."""
    rows = setting_rows()
    by_path = {row.path: row for row in rows}
    out: list[str] = []
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            title = "Top-level keys" if section == "top level" else f"`{section}`"
            out += ["", f"### {title}", ""]
            out += ["| YAML path | type | unit | default | environment variable | description |"]
            out += ["|---|---|---|---|---|---|"]
        env = f"`{row.env}`"
        if row.path == "secret_key":
            env += " (only: never in a file)"
        cells = [
            f"`{row.path}`",
            _cell(row.type),
            row.unit,
            _cell(row.default),
            env,
            _cell(row.description),
        ]
        out.append("| " + " | ".join(cells) + " |")
    profiles = _profile_values()
    keys = sorted({path for values in profiles.values() for path in values})
    out += ["", "### What the profiles set", ""]
    out += [
        "`--profile` / `TOOLQ_PROFILE` loads one of these over the defaults "
        "(`config/production.yaml`, `config/development.yaml`); the project file and "
        "`TOOLQ_*` override them.",
        "",
    ]
    out += ["| key | default | " + " | ".join(f"`{p}`" for p in PROFILES) + " |"]
    out += ["|---|---|" + "---|" * len(PROFILES)]
    for path in keys:
        row = by_path.get(path)
        kind = "duration" if row is not None and row.type.startswith("duration") else ""
        parse = _parse_duration if kind else (lambda value: value)
        default = row.default if row is not None else "—"
        cells = [f"`{path}`", _cell(default)]
        for name in PROFILES:
            value = profiles[name].get(path)
            cells.append(
                "" if path not in profiles[name] else _cell(_format_value(parse(value), kind))
            )
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out).strip() + "\n"


# -- command line --------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandDoc:
    path: str
    """``toolq dlq replay``."""
    usage: str
    help: str
    params: list[tuple[str, str, str, str]]
    """(names, type, default, help) per argument and option."""
    is_group: bool


_PARAM_TYPES = {int: "integer", float: "number", Path: "path"}


def _param_type(param: Any) -> str:
    """integer, number or path ("" for text and flags), from click's or typer's own type."""
    click_type = getattr(param, "type", None)
    if click_type is not None:
        name = str(getattr(click_type, "name", "")).lower()
        return "" if name in ("text", "boolean") else name
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return _PARAM_TYPES.get(annotation, "")


def _param_doc(param: Any) -> tuple[str, str, str, str]:
    if param.param_type_name == "argument":
        names = f"`{(param.metavar or param.name or '').upper()}`"
        kind = "argument" + ("" if param.required else ", optional")
    else:
        names = ", ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
        kind = "flag" if getattr(param, "is_flag", False) else "option"
    type_name = _param_type(param)
    if type_name:
        kind += f", {type_name}"
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None or high is not None:
        kind += f" ({'' if low is None else low}…{'' if high is None else high})"
    if getattr(param, "multiple", False):
        kind += ", repeatable"
    default = param.default
    if (
        default is None
        or default == ()
        or callable(default)
        or param.required
        or (getattr(param, "is_flag", False) and default is False)
    ):
        default_text = "required" if param.required else ""
    else:
        default_text = f"`{default}`"
    return names, kind, default_text, getattr(param, "help", None) or ""


def cli_commands() -> list[CommandDoc]:
    """Every command and group of the typer app, depth first, in registration order.

    Duck-typed: typer may bring a click of its own (``typer._click``)."""
    import typer.main

    from toolq.cli import app

    root = typer.main.get_command(app)
    docs: list[CommandDoc] = []

    def walk(command: Any, ctx: Any) -> None:
        pieces = " ".join(command.collect_usage_pieces(ctx))
        pieces = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), pieces)
        pieces = re.sub(r"\[([a-z_]+)\]", lambda m: f"[{m.group(1).upper()}]", pieces)
        params = [
            _param_doc(p)
            for p in command.get_params(ctx)
            if not getattr(p, "hidden", False) and p.name != "help"
        ]
        docs.append(
            CommandDoc(
                path=ctx.command_path,
                usage=f"{ctx.command_path} {pieces}".strip(),
                help=inspect.cleandoc(command.help or ""),
                params=params,
                is_group=hasattr(command, "list_commands"),
            )
        )
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, sub.context_class(sub, info_name=name, parent=ctx))

    walk(root, root.context_class(root, info_name="toolq"))
    return docs


def cli_reference() -> str:
    """The markdown of the command-line reference: a table of every command, then each."""
    commands = [doc for doc in cli_commands() if doc.path != "toolq"]
    out = ["| command | what it does |", "|---|---|"]
    for doc in commands:
        anchor = re.sub(r"[^a-z0-9]+", "-", doc.path.lower()).strip("-")
        first = doc.help.split("\n\n")[0]
        out.append(f"| [`{doc.path}`](#{anchor}) | {_cell(first)} |")
    for doc in commands:
        out += ["", f"### `{doc.path}`", ""]
        if doc.help:
            out += [_escape_angles(doc.help.replace("\b\n", "")), ""]
        out += ["```", doc.usage, "```", ""]
        if doc.params:
            out += ["| argument or option | kind | default | description |", "|---|---|---|---|"]
            for names, kind, default, text in doc.params:
                out.append(f"| {names} | {_cell(kind)} | {_cell(default)} | {_cell(text)} |")
            out.append("")
    return "\n".join(out).strip() + "\n"


# -- MkDocs events -------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_reference())
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for page, source in BENCH_PAGES.items():
        path = ROOT / source
        text = path.read_text(encoding="utf-8")
        files.append(File.generated(config, page, content=text))
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            if not image.startswith(("http://", "https://")):
                target = f"{Path(page).parent.as_posix()}/{image}"
                if files.get_file_from_path(target) is None:
                    files.append(
                        File.generated(config, target, abs_src_path=str(path.parent / image))
                    )
    return files
