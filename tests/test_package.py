"""The public surface and the installed layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

import toolq
from toolq.errors import FAILURE_CLASSES, ToolFailure

ROOT = Path(__file__).resolve().parent.parent


def test_all_is_sorted_and_complete() -> None:
    assert toolq.__all__ == sorted(toolq.__all__)
    public = {
        name
        for name, value in vars(toolq).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert public <= set(toolq.__all__)
    for name in toolq.__all__:
        assert hasattr(toolq, name), name


def test_error_kinds_map_one_to_one_to_classes() -> None:
    kinds = {
        "tool_error",
        "timeout",
        "not_found",
        "invalid_input",
        "output_too_large",
        "invalid_output",
        "crashed",
        "circuit_open",
        "memory_exceeded",
        "rate_limited",
        "cancelled",
    }
    assert set(FAILURE_CLASSES) == kinds
    assert all(
        issubclass(cls, ToolFailure) and cls.kind == kind for kind, cls in FAILURE_CLASSES.items()
    )
    retryable = {kind for kind, cls in FAILURE_CLASSES.items() if cls.retryable}
    assert retryable == {"timeout", "crashed"}  # a thrown error is retried when it says so


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"  # build from a copy: a build leaves build/ behind
    for name in ("pyproject.toml", "README.md", "toolq", "config", "workers", "producers", "cli"):
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (built,) = tmp_path.glob("toolq-*.whl")
    return built


def test_wheel_installs_only_the_toolq_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {name.split("/", 1)[0] for name in names}
    assert top_levels == {"toolq", f"toolq-{toolq.__version__}.dist-info"}
    for shipped in (
        "toolq/config/production.yaml",
        "toolq/workers/runtime/wrapper.ts",
        "toolq/producers/client.py",
        "toolq/cli/bench_baseline.py",
        "toolq/cli/projects/weather/compozy.yaml",
        "toolq/cli/projects/weather/entrypoint.ts",
        "toolq/py.typed",
    ):
        assert shipped in names
    assert not any(name.startswith(("toolq/tests", "bench/")) for name in names)


def test_demo_runs_from_the_installed_wheel_outside_the_checkout(
    wheel: Path, redis_url: str, bun: Path, tmp_path: Path
) -> None:
    """As in the Docker image: the wheel installed, Bun on PATH, no checkout anywhere.
    Twice in a row: the demo's failing examples must not break the next run."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, wheel],
        check=True,
        capture_output=True,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(site),  # ahead of the checkout's editable install
        "PATH": f"{bun.parent}:{os.environ.get('PATH', '')}",
        "TOOLQ_REDIS_URL": redis_url,
    }
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "toolq", "demo"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        unwrapped = proc.stdout.replace("\n", "")  # rich wraps long paths
        assert str(site / "toolq" / "cli" / "projects" / "weather") in unwrapped


def test_no_bare_config_or_workers_module_is_importable() -> None:
    probe = "import importlib.util as u; print(u.find_spec('config'), u.find_spec('workers'))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", check=True
    ).stdout
    assert out.strip() == "None None"


def test_profiles_and_wrapper_ship_with_the_package() -> None:
    from importlib import resources

    assert resources.files("toolq.config").joinpath("production.yaml").is_file()
    assert resources.files("toolq.config").joinpath("development.yaml").is_file()
    assert resources.files("toolq.workers.runtime").joinpath("wrapper.ts").is_file()
