"""The corpus tier: widely used npm packages under the default permissions, sandboxed.

Each package of tests/corpus/package.json (pinned in its bun.lock, installed by `make
setup` with the pinned Bun) is imported and used for something small by a tool of its
own (tests/corpus/entrypoint.ts), through a real worker, in warm and in spawn mode: one
worker per mode, every call enqueued at once. Pure-JavaScript packages work; a package
that loads native code fails with toolq's `--allow-ffi` error at the call that loads it,
and its `_ffi` twin, granted --allow-ffi, works.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from toolq import ToolClient, ToolResult
from toolq.config import load_settings
from toolq.workers.process import WorkerProcess

CORPUS = Path(__file__).parent / "corpus"
NATIVE = {"sharp": "sharp", "@node-rs/argon2": "node_rs_argon2"}
"""Packages that load a Node-API addon, by tool id."""
MODES = ("warm", "spawn")


def tool_id(package: str) -> str:
    """The tool that uses ``package`` (entrypoint.ts names them so)."""
    return package.removeprefix("@").replace("/", "_").replace("-", "_").replace(".", "_")


PACKAGES = sorted(json.loads((CORPUS / "package.json").read_text())["dependencies"])


def test_the_corpus_is_pinned_and_large_enough() -> None:
    lock = (CORPUS / "bun.lock").read_text()
    assert len(PACKAGES) >= 30
    assert set(NATIVE) <= set(PACKAGES)
    for package in PACKAGES:
        version = json.loads((CORPUS / "package.json").read_text())["dependencies"][package]
        assert version[0].isdigit(), f"{package}: pin an exact version, not {version}"
        assert f'"{package}@{version}"' in lock, package


@pytest.fixture(scope="module")
def outcomes(redis_url: str) -> Iterator[dict[tuple[str, str], ToolResult]]:
    """Every corpus call in both modes: (mode, tool id) -> its result."""
    if not (CORPUS / "node_modules").is_dir():
        pytest.fail("the corpus is not installed: run `make setup`")
    settings = load_settings(CORPUS / "warm.yaml", environ={}, overrides={"redis_url": redis_url})
    with ToolClient(settings) as client:
        workers = []
        try:
            for mode in MODES:
                worker = WorkerProcess(
                    config=CORPUS / f"{mode}.yaml",
                    redis_url=redis_url,
                    queues=[f"corpus-{mode}"],
                    concurrency=4,
                )
                workers.append(worker)
                worker.start(client.app, timeout_s=90)
            ids = [tool_id(p) for p in PACKAGES] + [f"{t}_ffi" for t in NATIVE.values()]
            calls = {
                (mode, tool): client.enqueue(tool, {}, queue=f"corpus-{mode}")
                for mode in MODES
                for tool in ids
            }
            yield {key: call.result(timeout=600) for key, call in calls.items()}
        finally:
            for worker in workers:
                worker.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_works_under_default_permissions(
    outcomes: dict[tuple[str, str], ToolResult], package: str, mode: str
) -> None:
    """Issue 22: chalk, commander, prettier and got threw "needs --allow-ffi" at import
    (they copy `process`); a native package's error is toolq's, at its call."""
    result = outcomes[(mode, tool_id(package))]
    assert result.metadata.get("sandbox") == "bwrap", result.metadata
    if package not in NATIVE:
        assert result.ok, (package, result.error)
        return
    assert result.error is not None and "needs --allow-ffi" in result.error.message, result.error
    granted = outcomes[(mode, f"{tool_id(package)}_ffi")]
    assert granted.ok, (package, granted.error)
