"""When the sandbox is what refused, say which permission would grant it.

Inside the sandbox a tool without ``--allow-net`` sees only ``getaddrinfo EAI_AGAIN
host`` or ``ECONNREFUSED``; without ``--allow-write`` a write sees ``EROFS`` or
``EACCES``; without ``--allow-run`` a spawn sees ``EPERM``. Those are true, and useless
to someone who does not know there is a sandbox. :func:`missing_grant` reads an error
text and the tool's permissions and names the grant, only when that grant is absent
(with it, the same error is the world's, not the sandbox's) and only for a sandboxed
run. Pure functions: the worker appends the sentence to a failed call's message and to
its start-up check's fix line.
"""

from __future__ import annotations

import os
import re

from toolq.permissions import Permissions

_DNS = re.compile(r"getaddrinfo (?:EAI_AGAIN|ENOTFOUND|EAI_NONAME) ([A-Za-z0-9.-]+)")
_NO_ROUTE = re.compile(
    r"\bECONNREFUSED\b|Unable to connect|FailedToOpenSocket|ConnectionRefused|ENETUNREACH"
)
_WRITE = re.compile(r"\b(EROFS|EACCES)\b[^'\"]*['\"]([^'\"]+)['\"]|\bEROFS\b|read-only file system")
_SPAWN = re.compile(r"\bEPERM\b[^\n]*(?:spawn|exec)\w*(?: '([^']+)')?")
_SCOPE = "runtime.permissions or tools.<id>.permissions"


def missing_grant(text: str, permissions: Permissions) -> str | None:
    """The permission the sandbox withheld that this error shows a need for, as a
    sentence, or None (no such sign, or the grant is there)."""
    if permissions.net is False:
        dns = _DNS.search(text)
        if dns is not None or _NO_ROUTE.search(text):
            host = dns.group(1) if dns is not None else "HOST"
            return (
                "the sandbox gives this tool no network, as it has no --allow-net; grant "
                f"it in {_SCOPE}, e.g. --allow-net={host}"
            )
    if permissions.write is not True:
        write = _WRITE.search(text)
        if write is not None:
            path = write.group(2)
            if path is not None and _granted(path, permissions.write):
                return None  # a granted path: the host's own permissions refused
            where = f"to {path} " if path else ""
            scoped = (
                f" and {', '.join(permissions.write)}"
                if isinstance(permissions.write, tuple)
                else ""
            )
            grant = os.path.dirname(path) if path else "PATH"
            return (
                f"the sandbox lets this tool write only under its TMPDIR{scoped}; to write "
                f"{where}grant --allow-write={grant} in {_SCOPE}"
            )
    if permissions.run is False:
        spawn = _SPAWN.search(text)
        if spawn is not None:
            program = spawn.group(1) or "PROGRAM"
            return (
                "the sandbox lets this tool start no programs, as it has no --allow-run; "
                f"grant --allow-run={os.path.basename(program)} in {_SCOPE}"
            )
    return None


def with_grant_hint(message: str, permissions: Permissions) -> str:
    """``message``, and the missing grant when there is one."""
    hint = missing_grant(message, permissions)
    return message if hint is None else f"{message} (toolq: {hint})"


def _granted(path: str, write: bool | tuple[str, ...]) -> bool:
    if not isinstance(write, tuple):
        return bool(write)
    return any(path == allowed or path.startswith(allowed.rstrip("/") + "/") for allowed in write)
