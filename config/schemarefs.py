"""Compozy's schema references in a tool definition's ``input``/``output`` schemas.

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

import re
from collections.abc import Mapping
from typing import Any

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
