"""Ground, rooms and roof (issue 25): the package door and the command load only what
they use. (Which module may import which is `make lint`'s import-linter contracts.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("celery", "kombu", "redis", "toolq.producers", "toolq.workers", "toolq.cli")
SETTINGS = ("toolq.config.settings", "toolq.config.loader", "jsonschema", "yaml")


def loaded_after(code: str, among: tuple[str, ...] = HEAVY) -> set[str]:
    """The modules of ``among`` a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return {name for name in json.loads(out.splitlines()[-1]) if name in among}


@pytest.mark.parametrize(
    "code",
    ["import toolq", "import toolq.errors", "import toolq.envelope", "import toolq.health"],
)
def test_the_package_and_its_ground_load_no_client_or_broker(code: str) -> None:
    assert loaded_after(code) == set()


def test_the_clients_load_when_first_asked_for() -> None:
    assert loaded_after("import toolq; toolq.ToolClient") >= {"celery", "toolq.producers"}
    assert loaded_after("from toolq import Settings") == set()


def test_the_command_loads_no_broker_until_a_command_needs_one() -> None:
    assert loaded_after("from toolq.cli import app, main") == {"toolq.cli"}


def test_the_health_probe_loads_no_settings_model() -> None:
    """``toolq health --file`` runs in every pod every few seconds (Kubernetes probes):
    what it imports, it imports there."""
    probe = (
        "from toolq.cli import operations; import toolq.health, toolq.config.durations\n"
        "toolq.health.check(__import__('pathlib').Path('/nonexistent'))"
    )
    assert loaded_after(probe, HEAVY + SETTINGS) == {"toolq.cli"}


def test_no_source_file_over_400_lines_without_its_reason() -> None:
    """Issue 25: a file over ~400 lines says at its top why it is one file."""
    root = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(
        ["git", "-C", str(root), "ls-files", "*.py", "*.ts", "*.c"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    unexplained = []
    for name in tracked:
        if name.startswith("tests/"):
            continue
        lines = (root / name).read_text().splitlines()
        if len(lines) > 400 and not any("Over 400 lines on purpose" in line for line in lines[:60]):
            unexplained.append(f"{name} ({len(lines)} lines)")
    assert not unexplained, f"over 400 lines, no reason at the top: {unexplained}"
