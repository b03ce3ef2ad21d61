"""Find the Bun binary without touching anyone's PATH.

Order: ``runtime.bun_path``; ``node_modules/.bin/bun`` in the project or any
parent of it; the one ``make`` installs inside the toolq checkout (npm package
``bun``, pinned in ``package.json``); finally ``bun`` on PATH.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from toolq.errors import ConfigError

_CHECKOUT = Path(__file__).resolve().parents[2]
"""The toolq checkout, in a development install (`make setup` puts Bun there)."""
WRAPPER = Path(__file__).resolve().with_name("wrapper.ts")


def find_bun(bun_path: str | None, project_dir: Path) -> Path:
    if bun_path:
        path = Path(bun_path).expanduser()
        if not path.is_absolute():
            path = project_dir / path
        if not _is_executable(path):
            raise ConfigError(
                f"runtime.bun_path: {path} is not an executable file", key="runtime.bun_path"
            )
        return path
    for directory in (project_dir, *project_dir.parents, _CHECKOUT):
        candidate = directory / "node_modules" / ".bin" / "bun"
        if _is_executable(candidate):
            return candidate.resolve()
    on_path = shutil.which("bun")
    if on_path:
        return Path(on_path)
    raise ConfigError(
        "Bun not found: run `make setup` in the toolq checkout, `npm install bun` in your "
        "project, or set runtime.bun_path",
        key="runtime.bun_path",
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and path.stat().st_mode & 0o111 != 0
