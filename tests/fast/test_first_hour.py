"""Issue 28's pure parts: an output schema that cannot be applied never raises (the
call ends invalid_output, not crashed), and the missing-grant sentence appears only
when the grant is absent. No Redis, no Bun (the end-to-end tests are in
tests/test_first_hour.py)."""

from __future__ import annotations

from pathlib import Path

from jsonschema import Draft7Validator
from jsonschema_specifications import REGISTRY

from toolq.config.tooldefs import ToolDefinition
from toolq.permissions import Permissions
from toolq.workers.grants import missing_grant
from toolq.workers.runtime.base import Outcome
from toolq.workers.runtime.workspace import linked_packages


def test_an_output_schema_that_cannot_be_applied_is_invalid_output_not_a_crash() -> None:
    broken = Draft7Validator({"$ref": "$global::schemas.#(id=='gone')"}, registry=REGISTRY)
    definition = ToolDefinition(id="t", source="test", _output=broken)
    problem = definition.output_problem({"a": 1})
    assert problem is not None and "cannot be applied" in problem and "Unresolvable" in problem


def test_a_profile_turns_it_into_invalid_output() -> None:
    from toolq.config.settings import Settings
    from toolq.workers.profile import Profiles

    broken = Draft7Validator({"$ref": "x::y"}, registry=REGISTRY)
    settings = Settings().with_definitions(
        {"t": ToolDefinition(id="t", source="s", _output=broken)}
    )
    outcome = Profiles(settings)["t"].check_output(Outcome({"a": 1}, None, 1, 1))
    assert outcome.error is not None and outcome.error.kind == "invalid_output"
    assert not outcome.error.retryable


def test_the_grant_is_named_only_when_it_is_missing() -> None:
    none = Permissions.parse(["--allow-read"])
    dns = "getaddrinfo EAI_AGAIN api.example.com"
    hint = missing_grant(dns, none)
    assert hint is not None and "--allow-net=api.example.com" in hint
    assert missing_grant(dns, Permissions.parse(["--allow-net"])) is None
    assert missing_grant(dns, Permissions.parse(["--allow-net=api.example.com"])) is None

    rofs = "EROFS: read-only file system, open '/srv/app/out.json'"
    hint = missing_grant(rofs, none)
    assert hint is not None and "--allow-write=/srv/app" in hint
    assert missing_grant(rofs, Permissions.parse(["--allow-write"])) is None
    granted = Permissions.parse(["--allow-write=/srv/app"])
    assert missing_grant(rofs, granted) is None  # the host refused a granted path
    elsewhere = missing_grant("EACCES: permission denied, open '/data/x'", granted)
    assert elsewhere is not None and "and /srv/app" in elsewhere

    spawn = "EPERM: operation not permitted, posix_spawn 'git'"
    hint = missing_grant(spawn, none)
    assert hint is not None and "--allow-run=git" in hint
    assert missing_grant(spawn, Permissions.parse(["--allow-run"])) is None
    assert missing_grant("TypeError: x is not a function", none) is None


def test_only_the_workspace_packages_node_modules_links_to_are_shown(tmp_path: Path) -> None:
    root = tmp_path / "mono"
    (root / "packages" / "p").mkdir(parents=True)
    (root / "packages" / "p" / "package.json").write_text('{"name": "@m/p"}')
    (root / "package.json").write_text('{"workspaces": ["packages/*", "app"]}')
    modules = root / "app" / "node_modules"
    (modules / "@m").mkdir(parents=True)
    (modules / "@m" / "p").symlink_to(root / "packages" / "p")
    outside = tmp_path / "home"  # what an install script could link to
    outside.mkdir()
    (outside / "package.json").write_text("{}")
    (modules / "sneaky").symlink_to(outside)
    (modules / "docs").symlink_to(root)  # inside the workspace, not a package
    assert linked_packages(root / "app") == [str((root / "packages" / "p").resolve())]
    (root / "package.json").write_text('{"workspaces": ["packages/*"]}')  # app not a member
    assert linked_packages(root / "app") == []
