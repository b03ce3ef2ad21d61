"""Checks made before Bun is spawned, as Compozy makes them (and a few size bounds).

Producers run the same checks before enqueueing, so bad calls fail at the call
site; workers run them again because a message may come from anywhere.
"""

from __future__ import annotations

import json
import posixpath
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from toolq.errors import InvalidInput

TOOL_ID = re.compile(r"^[a-zA-Z0-9_/.-]+$")
ENV_KEY = re.compile(r"^[A-Z0-9_]+$")
"""A call's env names: upper case, digits, '_' (Compozy's rule; lower-case proxy and
loader variables such as ``http_proxy`` are excluded by it)."""
FORBIDDEN_ENV_PREFIXES = (
    # the dynamic loader, libc and its allocator (LD_AUDIT, LD_PRELOAD, GLIBC_TUNABLES…)
    "LD_",
    "DYLD_",
    "MALLOC_",
    "GLIBC_",
    "GCONV_",
    # Bun, JavaScriptCore, Node (BUN_OPTIONS, BUN_JSC_*, JSC_*, NODE_OPTIONS…)
    "BUN_",
    "JSC_",
    "NODE_",
    "NPM_CONFIG_",
    "UV_",
    # toolq's and Compozy's own
    "TOOLQ_",
    "COMPOZY_",
    # interpreters and programs a tool may run with --allow-run (start-up code, configs)
    "PYTHON",
    "PERL",
    "RUBY",
    "GIT_",
    "OPENSSL_",
    "SSL_",
    "CURL_",
    "XDG_",
    "__",
)
FORBIDDEN_ENV_SUFFIXES = ("_PROXY",)
"""HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY…: they would redirect the tool's traffic."""
FORBIDDEN_ENV_KEYS = frozenset(
    {
        # set by toolq, or read by libc/the resolver/locale code from a path
        "PATH",
        "HOME",
        "TMPDIR",
        "IFS",
        "LOCPATH",
        "NLSPATH",
        "TZDIR",
        "HOSTALIASES",
        "RES_OPTIONS",
        "LOCALDOMAIN",
        "RESOLV_HOST_CONF",
        "NIS_PATH",
        "GETCONF_DIR",
        "TERMINFO",
        "TERMINFO_DIRS",
        "REQUESTS_CA_BUNDLE",
        # shells a tool may start (--allow-run)
        "ENV",
        "BASH_ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "PROMPT_COMMAND",
        "CDPATH",
        "GLOBIGNORE",
        # JVM start-up options
        "JAVA_TOOL_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "_JAVA_OPTIONS",
        "CLASSPATH",
        # Compozy's list, kept by name
        "DYLD_INSERT_LIBRARIES",
        "BUN_CONFIG_PROFILE",
    }
)
CALL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
"""A call id as toolq makes them: a UUID, lower-case hex (what `toolq enqueue` prints)."""
MAX_TOOL_ID_LENGTH = 256
MAX_JSON_DEPTH = 100
"""Deeper input is refused: no real tool input nests this far, and a deep enough one
would exhaust the recursion of every JSON codec on its way (Python's, kombu's)."""
MAX_INPUT_BYTES = 10 * 1024 * 1024
MAX_ENV_NAMES = 128
MAX_ENV_BYTES = 64 * 1024
"""A call's env is for credentials and settings, not data: more names or bytes than
these are refused (each value is also looked for in everything a failed call stores)."""
"""A request (input, config, env) larger than this is refused before anything runs."""


def validate_tool_id(tool_id: Any) -> str:
    if not isinstance(tool_id, str) or not tool_id:
        raise InvalidInput("tool id must be a non-empty string", "ValidationError")
    if len(tool_id) > MAX_TOOL_ID_LENGTH:
        raise InvalidInput(
            f"tool id longer than {MAX_TOOL_ID_LENGTH} characters", "ValidationError"
        )
    if not TOOL_ID.fullmatch(tool_id):
        raise InvalidInput(
            f"invalid tool id {tool_id!r}: use letters, digits, '_', '/', '.', '-'",
            "ValidationError",
        )
    if ".." in tool_id or tool_id.startswith(("/", ".")):
        raise InvalidInput(
            f"invalid tool id {tool_id!r}: no '..' and no leading '/' or '.'", "ValidationError"
        )
    if posixpath.normpath(tool_id) != tool_id or unicodedata.normalize("NFC", tool_id) != tool_id:
        raise InvalidInput(f"invalid tool id {tool_id!r}: not in canonical form", "ValidationError")
    return tool_id


def validate_call_id(call_id: Any) -> str:
    """A call id a command may name (``toolq cancel``): only the shape toolq gives ids,
    so a name cannot grow Redis and every worker's memory (each is kept for a day)."""
    if not isinstance(call_id, str) or not CALL_ID.fullmatch(call_id):
        shown = repr(call_id)[:60] + ("..." if len(repr(call_id)) > 60 else "")
        raise InvalidInput(
            f"invalid call id {shown}: a call id is a UUID as `toolq enqueue` prints it "
            "(8-4-4-4-12 lower-case hex digits)",
            "ValidationError",
        )
    return call_id


def env_name_refused(key: str) -> str | None:
    """Why a call may not set ``key`` (None: it may). Names that change how the loader,
    libc, Bun, Node or a program the tool runs behave are refused by prefix, suffix or
    name; anything else matching ``^[A-Z0-9_]+$`` is plain data for the tool."""
    if not ENV_KEY.match(key):
        return "use A-Z, 0-9 and '_'"
    if key in FORBIDDEN_ENV_KEYS:
        return "it is set by toolq or changes how libc, a shell or a runtime behaves"
    for prefix in FORBIDDEN_ENV_PREFIXES:
        if key.startswith(prefix):
            return f"names starting with {prefix} change how the loader or a runtime behaves"
    for suffix in FORBIDDEN_ENV_SUFFIXES:
        if key.endswith(suffix):
            return f"names ending with {suffix} would redirect the tool's network traffic"
    return None


def validate_env(env: Any) -> dict[str, str]:
    """The call's env, checked by name and value (producers and workers both call this)."""
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidInput("env must be a mapping of names to strings", "ValidationError")
    if len(env) > MAX_ENV_NAMES:
        raise InvalidInput(
            f"env has {len(env)} names, over the limit of {MAX_ENV_NAMES}", "ValidationError"
        )
    size = 0
    checked: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_KEY.fullmatch(key):
            raise InvalidInput(f"invalid env name {key!r}: use A-Z, 0-9 and '_'", "ValidationError")
        reason = env_name_refused(key)
        if reason is not None:
            raise InvalidInput(f"env name {key} is not allowed: {reason}", "ValidationError")
        if not isinstance(value, str):
            raise InvalidInput(f"env {key} must be a string", "ValidationError")
        if any(ch in value for ch in "\r\n\x00"):
            raise InvalidInput(f"env {key} must not contain CR, LF or NUL", "ValidationError")
        size += len(key) + len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_ENV_BYTES:
            raise InvalidInput(
                f"env is over the limit of {MAX_ENV_BYTES} bytes (names and values)",
                "ValidationError",
            )
        checked[key] = value
    return checked


def check_input_size(size: int, limit: int = MAX_INPUT_BYTES) -> None:
    if size > limit:
        raise InvalidInput(
            f"input is {size} bytes, over the limit of {limit} bytes", "InputTooLarge"
        )


def json_size(value: Any, what: str = "input") -> int:
    """Bytes of ``value`` as compact JSON; :class:`InvalidInput` if it is not JSON (NaN,
    objects, non-string keys) or nests deeper than :data:`MAX_JSON_DEPTH`."""
    check_depth(value, what)
    try:
        return len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}", "ParseError") from None


def check_depth(value: Any, what: str = "input", limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse nesting deeper than ``limit``, without recursion (so a deep value cannot
    blow the stack while being checked)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            raise InvalidInput(f"{what} nests deeper than {limit} levels", "ValidationError")
        stack.extend((child, depth + 1) for child in children)


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_AS_PARENS = bytes.maketrans(b"[]{}", b"()()")
_RUN = re.compile(rb"\(+|\)+")
_LEAF_PASSES = 8


def text_nests_deeper(text: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``text`` nests deeper than ``limit``, found before it is parsed (a
    parser recurses once per level: a few thousand levels raise ``RecursionError``).

    Strings are cut out and every byte but brackets deleted (in C: ``replace``, ``split``,
    ``translate``); a few passes then remove the innermost pairs (each pass lowers the
    depth by one and leaves at most 1/k of the leaves, so the last step, a walk over runs
    of brackets, is short). Linear: for 10 MB of small objects about as long as
    json.loads of the same text (bench/investigations/depth_check_cost.py); nothing when there are
    fewer brackets than ``limit``. Text that is not JSON may be counted wrongly; the
    parser refuses it."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return False
    # Outside strings: drop escaped backslashes, then escaped quotes (both occur only
    # inside strings), and every other piece between quotes is a string's content.
    unescaped = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(_AS_PARENS, _NOT_BRACKETS)
    removed = 0
    while removed < _LEAF_PASSES:
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            break
        brackets, removed = shorter, removed + 1
    if removed > limit:
        return True
    depth = 0
    for run in _RUN.finditer(brackets):
        length = run.end() - run.start()
        if brackets[run.start()] == ord("("):
            depth += length
            if depth + removed > limit:
                return True
        else:
            depth -= length
    return False
