"""The worker image builds what `make setup` builds: a compiled helper missing from the image
is a feature that silently falls back there (netshim: raw sockets get no route; cgjoin: a
shell and setpriv join cgroups, ~2 ms of CPU more per spawned process)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _built_by_make() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    names = dict(re.findall(r"^(\w+) := (workers/runtime/\S+)$", makefile, re.MULTILINE))
    rules = re.findall(r"^\$\((\w+)\): workers/runtime/\S+\.c$", makefile, re.MULTILINE)
    return {names[rule] for rule in rules}


def _built_by_image() -> set[str]:
    dockerfile = (ROOT / "Dockerfile").read_text()
    return set(re.findall(r"\bcc\b[^\n&]*-o (workers/runtime/\S+)", dockerfile))


def test_the_image_builds_every_helper_make_setup_builds() -> None:
    by_make = _built_by_make()
    assert {"workers/runtime/netshim.so", "workers/runtime/cgjoin"} <= by_make
    assert by_make <= _built_by_image(), f"not built in the image: {by_make - _built_by_image()}"
