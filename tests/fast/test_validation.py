"""Checks made before anything runs, as Compozy makes them."""

from __future__ import annotations

import pytest

from toolq.errors import InvalidInput
from toolq.validation import check_input_size, validate_env, validate_tool_id


@pytest.mark.parametrize("tool_id", ["weather", "a/b", "pkg.tool-1", "T_2"])
def test_good_tool_ids(tool_id: str) -> None:
    assert validate_tool_id(tool_id) == tool_id


@pytest.mark.parametrize(
    "tool_id",
    [
        "",
        "../etc",
        "a/../b",
        "/abs",
        ".hidden",
        "has space",
        "semi;colon",
        "a//b",
        "a/",
        "é",
        None,
        3,
        "x" * 300,
    ],
)
def test_bad_tool_ids(tool_id: object) -> None:
    with pytest.raises(InvalidInput):
        validate_tool_id(tool_id)


def test_good_env() -> None:
    assert validate_env({"API_KEY": "x", "N_1": ""}) == {"API_KEY": "x", "N_1": ""}
    assert validate_env(None) == {}


@pytest.mark.parametrize(
    "env",
    [
        {"lower": "x"},
        {"WITH-DASH": "x"},
        {"LD_PRELOAD": "/evil.so"},
        {"LD_LIBRARY_PATH": "/x"},
        {"DYLD_INSERT_LIBRARIES": "/x"},
        {"DYLD_LIBRARY_PATH": "/x"},
        {"NODE_OPTIONS": "--require evil"},
        {"BUN_CONFIG_PROFILE": "x"},
        {"KEY": "line\nbreak"},
        {"KEY": "carriage\rreturn"},
        {"KEY": "nul\x00"},
        {"KEY": 3},
        ["KEY=x"],
    ],
)
def test_bad_env(env: object) -> None:
    with pytest.raises(InvalidInput):
        validate_env(env)


def test_input_size_limit() -> None:
    check_input_size(10)
    with pytest.raises(InvalidInput, match="over the limit"):
        check_input_size(11, limit=10)
