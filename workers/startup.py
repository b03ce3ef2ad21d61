"""Start-up checks: a worker loads the project's entrypoint once, the way its tools will
run (same Bun, sandbox, permissions and limits), before it says it is ready.

Without this a project whose dependencies were never installed, or whose entrypoint
does not parse, starts "ready" and then fails every call as a retryable
``tool_error`` (tripping its breaker). Here the worker exits with the error and the fix.
"""

from __future__ import annotations

import logging
import os
import subprocess

from toolq.config.settings import Settings
from toolq.errors import ConfigError
from toolq.workers.grants import missing_grant
from toolq.workers.packages import install_command, missing_module_hint
from toolq.workers.runtime.launch import Launcher, base_environment
from toolq.workers.runtime.limits import ResourceLimits
from toolq.workers.runtime.sandbox import Permissions

log = logging.getLogger("toolq.worker")

CHECK_TIMEOUT_S = 60.0
"""Loading the entrypoint (its top-level code) must finish within this."""
ERROR_SHOWN = 1500
"""How much of Bun's error output the message carries."""
_MISSING_MODULE = ("Cannot find package", "Cannot find module", "Could not resolve")


def check_entrypoint(
    settings: Settings,
    launcher: Launcher,
    permissions: Permissions,
    resources: ResourceLimits,
    timeout_s: float = CHECK_TIMEOUT_S,
) -> list[str]:
    """Load the entrypoint in a Bun process of its own; return the tools it exports, or
    raise :class:`ConfigError` with Bun's error and what to do about it."""
    try:
        launched = launcher.launch(
            permissions=permissions,
            limits=resources,
            env=base_environment(permissions.env),
            warm=False,
            check=True,
        )
    except OSError as exc:
        raise _error(settings, f"cannot start Bun: {exc}") from None
    try:
        _, stderr = launched.proc.communicate(timeout=timeout_s)
        code = launched.returncode()
    except subprocess.TimeoutExpired:
        raise _error(
            settings, f"loading it took longer than {timeout_s:g}s (top-level code hangs?)"
        ) from None
    finally:
        launched.stop()
    text = stderr.decode(errors="replace").strip()
    if code == 0:
        tools = text.rsplit("tools: ", 1)[-1].strip() if "tools: " in text else ""
        return [tool for tool in tools.split(", ") if tool]
    return_error = text[-ERROR_SHOWN:] or f"Bun exited with code {code}"
    sandboxed = launcher.sandbox is not None
    raise _error(settings, return_error, hint=_hint(settings, text, permissions, sandboxed))


def _hint(settings: Settings, text: str, permissions: Permissions, sandboxed: bool) -> str:
    project = settings.project_dir
    missing = missing_module_hint(project, text)
    if missing is not None:
        return missing
    grant = missing_grant(text, permissions) if sandboxed else None
    if grant is not None:
        return f"the entrypoint's top-level code was refused: {grant}"
    if any(marker in text for marker in _MISSING_MODULE) or (
        (project / "package.json").is_file() and not (project / "node_modules").is_dir()
    ):
        return (
            f"its dependencies are not installed: run `{install_command(project)}` (the Bun "
            "the workers run; toolq runs Bun with --no-install and never installs packages "
            "itself)"
        )
    if "needs --allow-ffi" in text:
        return (
            "a module the entrypoint imports loads native code as it loads, which the sandbox "
            "refuses without the grant: add --allow-ffi to runtime.permissions (the native "
            "code then runs inside the sandbox), or use a package without native code"
        )
    return "fix the entrypoint (or a module it imports) so that `bun` can load it"


def _error(settings: Settings, detail: str, hint: str | None = None) -> ConfigError:
    entrypoint = settings.entrypoint_path
    message = f"{settings.source}: runtime.entrypoint: cannot load {entrypoint}: {detail}"
    if hint:
        message += f"{os.linesep}fix: {hint}"
    return ConfigError(message, key="runtime.entrypoint", source=settings.source)


def report_definitions(
    settings: Settings, exported: list[str], environ: dict[str, str] | None = None
) -> None:
    """Log what would otherwise surface one call at a time: an entrypoint exporting no
    tools, definitions of tools it does not export, Deno-era definitions toolq does not
    run (``execute:`` files, definitions inside workflow files), env templates naming
    variables this worker lacks."""
    env = os.environ if environ is None else environ
    log.info(
        "project %s: entrypoint %s exports %s",
        settings.project or "(unnamed)",
        settings.entrypoint_path,
        ", ".join(exported) or "no tools",
    )
    if not exported:
        log.warning(
            "the entrypoint %s exports no tools: every call will end as not_found; export "
            "an object whose keys are tool ids and whose values are functions "
            "(`export default { my_tool }`), or the functions themselves as named exports",
            settings.entrypoint_path,
        )
    if "default" in exported and "default" not in settings.definitions:
        log.warning(
            "the entrypoint %s default-exports a function, so its one tool is named "
            "'default': default-export an object whose keys are the tool ids instead "
            "(`export default { my_tool }`)",
            settings.entrypoint_path,
        )
    for note in settings.definition_notes:
        log.warning("%s", note)
    for tool_id, definition in sorted(settings.definitions.items()):
        if tool_id not in exported:
            log.warning(
                "tool %s is defined in %s but the entrypoint %s does not export it: its calls "
                "will end as not_found; add its function to the entrypoint's default export "
                "under %r (or remove the definition)",
                tool_id,
                definition.source,
                settings.entrypoint_path.name,
                tool_id,
            )
        missing = sorted(name for name in definition.env_variables() if name not in env)
        if missing:
            log.warning(
                "tool %s: its env reads %s, not set in this worker's environment: its calls "
                "will be refused",
                tool_id,
                ", ".join(missing),
            )
