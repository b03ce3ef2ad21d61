"""The documentation (docs/, mkdocs.yml, README.md) against the code it describes.

`make docs` builds the site with --strict (broken links, anchors, pages missing from nav);
these tests check what a build cannot: that the generated references (docs/hooks.py) name
every setting and every command and option, that every setting has a description, that
every setting key and TOOLQ_* variable the pages mention exists, and that the README stays
a short front door whose links resolve."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from toolq.cli import app
from toolq.config.loader import RUNTIME_ALIASES, RUNTIME_IGNORED, load_settings
from toolq.config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("toolq_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf setting's YAML path, walked from the model on its own."""
    paths: set[str] = set()
    for name, info in model.model_fields.items():
        key = info.alias or name
        annotation: Any = info.annotation
        args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
        inner = args[0] if len(args) == 1 else annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            paths |= _leaf_paths(inner, f"{prefix}{key}.")
        elif key == "tools":
            tool_model = Settings.model_fields["tools"].annotation.__args__[1]  # type: ignore[union-attr]
            paths |= _leaf_paths(tool_model, f"{prefix}tools.<id>.")
        else:
            paths.add(prefix + key)
    return paths


SETTING_PATHS = _leaf_paths(Settings)


def test_the_settings_reference_names_every_setting_with_a_description(
    hooks: ModuleType,
) -> None:
    rows = {row.path: row for row in hooks.setting_rows()}
    assert set(rows) == SETTING_PATHS
    undescribed = sorted(path for path, row in rows.items() if not row.description.strip())
    assert undescribed == [], "add a description (Field(description=) or a docstring)"
    reference = hooks.settings_reference()
    for row in rows.values():
        assert f"`{row.env}`" in reference, row.path
    assert "`TOOLQ_RUNTIME__TIMEOUT`" in reference  # nested keys by their YAML alias
    assert "| `runtime.timeout` | duration (&gt; 0) | seconds | `1m` |" in reference


def _command_paths() -> list[list[str]]:
    paths: list[list[str]] = []
    for command in app.registered_commands:
        name = command.name or command.callback.__name__  # type: ignore[union-attr]
        paths.append([name.replace("_", "-")])
    for group in app.registered_groups:
        assert group.typer_instance is not None and group.name is not None
        paths.append([group.name])
        for command in group.typer_instance.registered_commands:
            name = command.name or command.callback.__name__  # type: ignore[union-attr]
            paths.append([group.name, name.replace("_", "-")])
    return paths


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_the_cli_reference_documents_every_command_and_option(
    hooks: ModuleType, path: list[str]
) -> None:
    reference = hooks.cli_reference()
    heading = f"### `toolq {' '.join(path)}`"
    assert heading in reference
    section = reference.split(heading, 1)[1].split("\n### ", 1)[0]
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # an option row starts with its name (rich box, required mark, a short form first)
    row = re.compile(r"^[\s│|*]*(?:-[a-zA-Z],?\s+)?(--[a-z][a-z0-9-]*)", re.M)
    options = set(row.findall(result.output)) - {"--help"}
    assert options or path[0] in ("breakers", "dlq", "keygen") or path == ["dlq", "purge"]
    missing = sorted(o for o in options if f"`{o}`" not in section)
    assert missing == [], f"toolq {' '.join(path)} --help names options the reference lacks"


def _documented_text() -> str:
    return "\n".join(p.read_text() for p in [*PAGES, ROOT / "README.md"])


def test_every_toolq_variable_the_docs_name_is_a_setting() -> None:
    loader_variables = {"TOOLQ_CONFIG", "TOOLQ_PROFILE"}
    unknown = []
    for name in set(re.findall(r"\bTOOLQ_[A-Z0-9_]*[A-Z0-9]\b", _documented_text())):
        if name in loader_variables:
            continue
        parts = name.removeprefix("TOOLQ_").lower().split("__")
        if parts[0] == "tools" and len(parts) > 2:
            parts[1] = "<id>"
        if ".".join(parts) not in SETTING_PATHS:
            unknown.append(name)
    assert sorted(unknown) == []


def test_every_setting_key_the_docs_name_exists() -> None:
    """`runtime.x`, `performance.x`, `circuit_breaker.x` and `tools.<id>.x(.y)` in code spans."""
    compozy_runtime = {f"runtime.{k}" for k in {*RUNTIME_ALIASES, *RUNTIME_IGNORED}}
    pattern = re.compile(
        r"`((?:runtime|performance|circuit_breaker|tools\.<id>)(?:\.[a-z_]+)+)"
        r"(?::[^`]*)?`"
    )
    found = set(pattern.findall(_documented_text()))
    sections = {p.rsplit(".", 1)[0] for p in SETTING_PATHS}
    unknown = sorted(k for k in found - SETTING_PATHS - compozy_runtime if k not in sections)
    assert unknown == []
    assert len(found) > 15  # the pattern does find the keys the pages name


def _leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in node.items():
        key = "<id>" if prefix == "tools." else key
        if isinstance(value, dict) and value and f"{prefix}{key}" not in SETTING_PATHS:
            paths |= _leaves(value, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


def test_the_example_configuration_loads_and_shows_every_setting(tmp_path: Path) -> None:
    """docs/configuration.md's example file is valid as written and names every setting
    (but `secret_key`, which a file may not hold)."""
    page = (DOCS / "configuration.md").read_text()
    example = page.split("## An example file", 1)[1].split("```yaml\n", 1)[1].split("```")[0]
    (tmp_path / "compozy.yaml").write_text(example)
    load_settings(tmp_path / "compozy.yaml", environ={})
    assert _leaves(yaml.safe_load(example)) == SETTING_PATHS - {"secret_key"}


def test_the_readme_is_a_short_front_door_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert "make demo" in readme and "make test" in readme
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len(local) > 10
    assert [link for link in local if not (ROOT / link).exists()] == []
    documented = {str(p.relative_to(ROOT)) for p in PAGES} - {"docs/index.md"}
    # the front door reaches every page but the generated ones (their nav is the site's)
    assert sorted(documented - set(local)) == []


REPO_PATH = re.compile(
    r"(?<![\w./-])((?:bench|cli|config|deploy|docs|producers|tests|toolq|workers)/[\w./*-]*\w/?)"
)


def test_every_repository_path_the_docs_name_exists() -> None:
    """Modules move (cli/, workers/call/, bench/investigations/): a page must follow."""
    missing, checked = set(), set()
    for page in [*PAGES, ROOT / "README.md"]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for _, span in re.findall(r"(`+)(.+?)\1", text, re.S):
            for path in REPO_PATH.findall(span):
                file_or_dir = re.search(r"\.\w+$", path) or path.endswith("/")
                if file_or_dir and "*" not in path:
                    checked.add(path)
                    if not (ROOT / path).exists():
                        missing.add(f"{page.relative_to(ROOT)}: {path}")
    assert sorted(missing) == []
    assert len(checked) > 50


def test_every_page_is_in_the_nav() -> None:
    """The site's build fails on it too (--strict); here it fails in the fast tier."""
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    missing = [str(p.relative_to(DOCS)) for p in PAGES if str(p.relative_to(DOCS)) not in nav]
    assert missing == []
